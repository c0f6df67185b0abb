"""What a benchmark run reports (its rows, ratios and machine) and the table it prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class Row:
    """One measured row: a model (step time, CPU time, memory, FLOPs, MFU, loss) or a loader (images/s, note)."""

    name: str
    images_per_s: Optional[float]
    step_ms: Optional[float] = None
    cpu_ms: Optional[float] = None
    peak_mem_mb: Optional[float] = None
    gflops_per_image: Optional[float] = None
    mfu: Optional[float] = None
    mfu_cpu_time: Optional[float] = None
    loss: Optional[float] = None
    note: str = ""


@dataclass
class Report:
    """A whole run: the machine, the shared setup, the GEMM ceiling, every row in the order asked, the ratios."""

    device: str
    device_name: str
    precision: str
    threads: int
    setup: Dict[str, Any]
    gemm_tflops: float
    rows: List[Row] = field(default_factory=list)
    ratios: Dict[str, float] = field(default_factory=dict)


def format_table(report: Report) -> str:
    """Markdown table of the rows plus the ceiling and ratios."""
    def show(value: Optional[float], fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    def percent(value: Optional[float]) -> str:
        return "-" if value is None else f"{value * 100:.1f}%"

    lines = [f"device: {report.device} ({report.device_name}), {report.threads} threads, {report.precision}; "
             f"GEMM ceiling {report.gemm_tflops * 1e3:.1f} GFLOP/s",
             f"setup: {report.setup}", "",
             "| row | images/s | step ms (median) | CPU ms/step | peak mem MB | GFLOP/image | MFU | MFU (CPU time) "
             "| loss | note |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in report.rows:
        lines.append(f"| {row.name} | {show(row.images_per_s, '.1f')} | {show(row.step_ms, '.1f')} | "
                     f"{show(row.cpu_ms, '.0f')} | "
                     f"{show(row.peak_mem_mb, '.0f')} | {show(row.gflops_per_image, '.3f')} | "
                     f"{percent(row.mfu)} | {percent(row.mfu_cpu_time)} | "
                     f"{show(row.loss, '.4f')} | {row.note} |")
    lines += [""] + [f"{key}: {value:.3f}" for key, value in report.ratios.items()]
    return "\n".join(lines)
