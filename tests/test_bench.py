"""The benchmark's tiny configuration runs and reports every row with sane numbers (figures, not timing asserts)."""

import importlib.util
import json

import pytest
import torch

from mimswin.bench import ROW_NAMES, cli, count_step_flops, main

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def test_tiny_benchmark_reports_every_row_with_positive_numbers(tmp_path, capsys):
    out = tmp_path / "bench.json"
    report = main(["--preset", "tiny", "--device", "cpu", "--batch", "4", "--steps", "1", "--warmup", "0",
                   "--num-workers", "0", "--json", str(out)])
    table = capsys.readouterr().out
    assert [row.name for row in report.rows] == list(ROW_NAMES)
    assert all(f"| {name} |" in table for name in ROW_NAMES)
    assert 1e9 < report.gemm_tflops * 1e12 < 1e15
    mimswin, hf, loader = report.rows
    if not HAVE_TRANSFORMERS:
        assert hf.images_per_s is None and "not measured" in hf.note
        hf = mimswin
    for row in (mimswin, hf):
        assert row.images_per_s > 0 and row.step_ms > 0 and row.peak_mem_mb >= 0
        assert 0 < row.mfu < 1, row
        assert 0.1 < row.loss < 10, row
    assert mimswin.gflops_per_image == pytest.approx(hf.gflops_per_image, rel=0.1)
    assert loader.images_per_s > 0
    saved = json.loads(out.read_text())
    assert [row["name"] for row in saved["rows"]] == list(ROW_NAMES)
    if HAVE_TRANSFORMERS:
        ratio = saved["ratios"]["mimswin_over_hf_images_per_s"]
        assert ratio == pytest.approx(mimswin.images_per_s / hf.images_per_s)


def test_flop_counter_sees_attention_on_cpu():
    query = torch.randn(2, 4, 16, 8, requires_grad=True)
    flops = count_step_flops(lambda q: torch.nn.functional.scaled_dot_product_attention(q, q, q).sum(), query,
                             torch.device("cpu"), "fp32")
    forward = 2 * (2 * 2 * 4 * 16 * 16 * 8)
    assert flops >= 3 * forward


@pytest.mark.parametrize("args, message", [
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "--device"),
    (["--rows", "mimswin-mae,bogus"], "unknown row"),
    (["--batch", "0"], "--batch"),
])
def test_bad_arguments_are_one_clear_error(args, message, capsys):
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimswin: error:") and message in err and len(err.strip().splitlines()) == 1
