"""The benchmark's printed table: one line per row, the ratios, and what machine it ran on."""

from __future__ import annotations

from typing import Optional

from mimswin.programs.bench.measure import Report


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
