"""One benchmark run: the requested loader and model rows measured in this process, the GEMM ceiling, the ratios."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from typing import Optional, Sequence

import torch

from mimswin.bench.contenders import BUILDERS, HF_ROWS, RATIOS, ROW_NAMES, Setup
from mimswin.bench.loader import measure_loaders
from mimswin.bench.measure import cpu_name, gemm_ceiling, measure_models
from mimswin.bench.report import Report, Row


def run_benchmark(setup: Setup, device: torch.device, precision: str, steps: int, warmup: int,
                  rows: Sequence[str] = ROW_NAMES, grad_checkpointing: bool = False, compile_model: bool = False,
                  num_workers: int = 2, data_path: Optional[str] = None) -> Report:
    """Measure every requested row and the GEMM ceiling in this process; rows keep the requested order."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    models = [row for row in rows if row in BUILDERS]
    if importlib.util.find_spec("transformers") is None:
        models = [row for row in models if row not in HF_ROWS]
    measured = measure_loaders(setup, device, steps, warmup, num_workers, rows, data_path)
    model_rows, ceiling = measure_models(models, setup, device, precision, steps, warmup, grad_checkpointing,
                                         compile_model) if models else ([], gemm_ceiling(device, precision))
    measured.update({row.name: row for row in model_rows})
    report = Report(device.type, name, precision, torch.get_num_threads(), asdict(setup), ceiling / 1e12)
    report.rows = [measured.get(row) or Row(row, None, note="not measured: pip install 'mimswin[bench]' (transformers)")
                   for row in rows]
    by_name = {row.name: row for row in report.rows if row.images_per_s}
    for key, top, bottom in RATIOS:
        if top in by_name and bottom in by_name:
            report.ratios[f"{key}_images_per_s"] = by_name[top].images_per_s / by_name[bottom].images_per_s
            if device.type == "cpu" and by_name[top].cpu_ms:
                report.ratios[f"{key}_by_cpu_time"] = by_name[bottom].cpu_ms / by_name[top].cpu_ms
    return report
