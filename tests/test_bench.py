"""The benchmark's tiny configuration runs and reports every row with sane numbers (figures, not timing asserts)."""

import importlib.util
import json
from dataclasses import replace

import pytest
import torch

from mimswin.bench import loader, measure
from mimswin.bench.contenders import BUILDERS, CROSS_ROWS, HF_ROWS, LOADER_ROWS, PRESETS, ROW_NAMES, SWIN_ROWS, VIT_ROWS
from mimswin.bench.measure import count_step_flops
from mimswin.programs.bench import cli, main, select_rows

HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def peak_in_this_process(name, setup, precision, warmup, grad_checkpointing, compile_model):
    """A row's build and warm-up peak measured in this process: what the benchmark does on a GPU, and here a
    stand-in for the fresh interpreter per row that `isolated_cpu_peak_mb` starts (tested on its own below)."""
    cpu = torch.device("cpu")
    with measure.PeakMemory(cpu) as memory:
        measure.build_and_warm_up(name, setup, measure.bench_images(setup, cpu), cpu, precision, warmup,
                                  grad_checkpointing, compile_model)
    return memory.peak_mb


def test_tiny_benchmark_reports_every_row_with_positive_numbers(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(measure, "isolated_cpu_peak_mb", peak_in_this_process)
    out = tmp_path / "bench.json"
    report = main(["--preset", "tiny", "--device", "cpu", "--batch", "4", "--steps", "1", "--warmup", "0",
                   "--num-workers", "0", "--json", str(out)])
    table = capsys.readouterr().out
    assert [row.name for row in report.rows] == list(ROW_NAMES)
    assert all(f"| {name} |" in table for name in ROW_NAMES)
    assert 1e9 < report.gemm_tflops * 1e12 < 1e15
    rows = {row.name: row for row in report.rows}
    if not HAVE_TRANSFORMERS:
        assert all(rows[name].images_per_s is None and "not measured" in rows[name].note for name in HF_ROWS)
    models = [row for row in report.rows
              if row.name not in LOADER_ROWS and (HAVE_TRANSFORMERS or row.name not in HF_ROWS)]
    for row in models:
        assert row.images_per_s > 0 and row.step_ms > 0 and row.cpu_ms > 0 and row.peak_mem_mb >= 0, row
        assert row.mfu > 0 and row.mfu_cpu_time > 0, row  # no upper bound: the GEMM peak and the step are timed apart
        assert 0.1 < row.loss < 10, row
    for name in LOADER_ROWS:
        assert rows[name].images_per_s > 0 and "MB/batch moved" in rows[name].note
    simmim, visible = rows["mimswin-simmim-swin"], rows["mimswin-mae-swin"]
    assert simmim.gflops_per_image > 0 and visible.gflops_per_image > 0
    assert all(rows[name].gflops_per_image > 0 for name in CROSS_ROWS)
    saved = json.loads(out.read_text())
    assert saved["ratios"]["loader_device_over_model_images_per_s"] == pytest.approx(
        rows["loader-device"].images_per_s / rows["mimswin-mae"].images_per_s)
    assert [row["name"] for row in saved["rows"]] == list(ROW_NAMES)
    assert saved["ratios"]["swin_visible_over_simmim_images_per_s"] == pytest.approx(
        visible.images_per_s / simmim.images_per_s)
    assert "swin_visible_over_simmim" in table.split("| loader |")[1]
    assert saved["ratios"]["cross_0.25_over_self_images_per_s"] == pytest.approx(
        rows[CROSS_ROWS[0]].images_per_s / rows["mimswin-mae"].images_per_s)
    if HAVE_TRANSFORMERS:
        assert rows["mimswin-mae"].gflops_per_image == pytest.approx(rows["hf-vitmae"].gflops_per_image, rel=0.1)
        assert simmim.gflops_per_image == pytest.approx(rows["hf-swin-simmim"].gflops_per_image, rel=0.1)
        for key, top, bottom in (("mimswin_over_hf", "mimswin-mae", "hf-vitmae"),
                                 ("swin_simmim_mimswin_over_hf", "mimswin-simmim-swin", "hf-swin-simmim"),
                                 ("cross_0.25_over_hf", CROSS_ROWS[0], "hf-vitmae")):
            ratio = saved["ratios"][f"{key}_images_per_s"]
            assert ratio == pytest.approx(rows[top].images_per_s / rows[bottom].images_per_s)


@pytest.mark.parametrize("name", ["mimswin-mae", *(["hf-vitmae"] if HAVE_TRANSFORMERS else [])])
def test_a_rows_cpu_peak_memory_is_measured_in_a_fresh_process(name):
    setup = PRESETS["tiny"]
    peak = measure.isolated_cpu_peak_mb(name, replace(setup, batch=4), "fp32", 0, False, False)
    assert peak > 0


def test_rows_import_their_libraries_from_modules_that_exist():
    assert set(measure.ROW_IMPORTS) == set(HF_ROWS)
    if HAVE_TRANSFORMERS:
        assert all(importlib.util.find_spec(module) for module in measure.ROW_IMPORTS.values())


def test_cross_rows_do_less_work_the_fewer_patches_they_predict():
    setup, cpu = PRESETS["tiny"], torch.device("cpu")
    images = torch.randn(2, 3, setup.img_size, setup.img_size)
    flops = {}
    for name in ("mimswin-mae", *CROSS_ROWS):
        torch.manual_seed(0)
        run = BUILDERS[name](setup, cpu)
        flops[name] = count_step_flops(run.loss_fn, images, cpu, "fp32")
    assert [run_name for run_name in sorted(flops, key=flops.get)] == [*CROSS_ROWS, "mimswin-mae"]


def test_row_groups_expand_in_order_without_repeats():
    assert select_rows("swin") == list(SWIN_ROWS)
    assert select_rows("loader, vit,mimswin-mae") == ["loader", *VIT_ROWS]
    assert select_rows("loaders") == ["loader", "loader-device", "loader-device-decode"]
    assert select_rows("all") == list(ROW_NAMES)
    assert select_rows("cross") == ["hf-vitmae", "mimswin-mae", *CROSS_ROWS]


def test_swin_visible_only_does_fewer_flops_than_simmim_at_swin_t():
    setup = PRESETS["cpu"]
    images = torch.randn(1, 3, setup.img_size, setup.img_size)
    flops = {}
    for name in ("mimswin-simmim-swin", "mimswin-mae-swin"):
        torch.manual_seed(0)
        run = BUILDERS[name](setup, torch.device("cpu"))
        flops[name] = count_step_flops(run.loss_fn, images, torch.device("cpu"), "fp32")
    # A quarter of the cells visible: at most 4x fewer FLOPs (the decoder and occupied windows cost on top).
    assert 1.5 < flops["mimswin-simmim-swin"] / flops["mimswin-mae-swin"] < 4


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
    (["--decoder-depth", "0"], "--decoder-depth"),
    (["--rows", ""], "unknown row"),
])
def test_bad_arguments_are_one_clear_error(args, message, capsys):
    assert cli(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("mimswin: error:") and message in err and len(err.strip().splitlines()) == 1


def test_model_rows_alone_write_no_photographs(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("photographs written for a run without loader rows")

    monkeypatch.setattr(loader, "write_photos", refuse)
    monkeypatch.setattr(loader, "have_photos", lambda: True)
    assert loader.measure_loaders(PRESETS["tiny"], torch.device("cpu"), 1, 0, 0, ["mimswin-mae"]) == {}
