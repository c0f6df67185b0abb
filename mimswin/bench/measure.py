"""How the benchmark measures its model rows: a timed training step, FLOPs, the GEMM ceiling, peak memory."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import multiprocessing
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mimswin.bench.contenders import BUILDERS, Contender, Setup
from mimswin.bench.report import Row


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "cpu"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, precision: str):
    """bf16 autocast as accelerate's `mixed_precision=bf16` applies it; a no-op context for fp32."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def gemm_ceiling(device: torch.device, precision: str, size: Optional[int] = None, repeats: int = 5) -> float:
    """Best matmul FLOP/s of `repeats` square products on `device` (the ceiling MFU is measured against)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    inner = 10 if device.type == "cuda" else 3
    torch.matmul(a, b)
    best = 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        for _ in range(inner):
            torch.matmul(a, b)
        synchronize(device)
        best = max(best, 2 * size ** 3 * inner / (time.perf_counter() - start))
    return best


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _flop_mapping() -> Dict[Any, Callable]:
    """FLOP formulas for SDPA kernels the counter does not know (the CPU flash kernel), reusing torch's formulas."""
    aten = torch.ops.aten
    mapping: Dict[Any, Callable] = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flops
    return mapping


def count_step_flops(loss_fn: Callable, images: torch.Tensor, device: torch.device, precision: str) -> int:
    """Forward + backward FLOPs of one step, from torch's counter (matmuls, convs, attention)."""
    with FlopCounterMode(display=False, custom_mapping=_flop_mapping()) as counter:
        with autocast(device, precision):
            loss = loss_fn(images)
        loss.backward()
    return counter.get_total_flops()


class PeakMemory:
    """Peak memory of a block above its level at entry: CUDA's allocator peak on GPU; on CPU the sampled process
    RSS (torch's CPU allocator keeps no statistics)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak_mb = device, 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096 / 2 ** 20

    def _sample(self, base: float) -> None:
        while not self._stop.wait(0.005):
            self.peak_mb = max(self.peak_mb, self._rss_mb() - base)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            self._thread = threading.Thread(target=self._sample, args=(self._rss_mb(),), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2 ** 20
        else:
            self._stop.set()
            self._thread.join()


def release_memory(device: torch.device) -> None:
    """Free what the previous row left, so each row's peak starts from the same floor."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class Trial:
    """A contender under measurement and what has been measured of it so far."""

    name: str
    run: Contender
    flops: int
    peak_mem_mb: float
    times: List[float] = field(default_factory=list)
    cpu_times: List[float] = field(default_factory=list)
    losses: List[torch.Tensor] = field(default_factory=list)


def train_step(run: Contender, images: torch.Tensor, device: torch.device, precision: str) -> tuple:
    """One full optimizer step; returns (wall seconds, process CPU seconds, detached loss)."""
    synchronize(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    with autocast(device, precision):
        loss = run.loss_fn(images)
    loss.backward()
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - cpu_start, loss.detach()


def bench_images(setup: Setup, device: torch.device) -> torch.Tensor:
    """The one fixed batch of random images every row trains on."""
    return torch.randn(setup.batch, 3, setup.img_size, setup.img_size, device=device,
                       generator=torch.Generator(device=device).manual_seed(0))


def build_and_warm_up(name: str, setup: Setup, images: torch.Tensor, device: torch.device, precision: str,
                      warmup: int, grad_checkpointing: bool, compile_model: bool) -> tuple:
    """Build a contender, count its FLOPs, switch on the flags and run the warm-up steps; returns (run, FLOPs).

    FLOPs are counted before checkpointing/compile are switched on: model FLOPs, not recomputed ones."""
    torch.manual_seed(0)
    run = BUILDERS[name](setup, device)
    run.model.train()
    flops = count_step_flops(run.loss_fn, images, device, precision)
    run.optimizer.zero_grad(set_to_none=True)
    if grad_checkpointing:
        run.enable_checkpointing()
    if compile_model:
        run.model.compile()
    for _ in range(max(1, warmup)):
        train_step(run, images, device, precision)
    return run, flops


# Modules a row imports on first build, imported before its memory is measured: library code is not the row's memory.
ROW_IMPORTS = {"hf-vitmae": "transformers.models.vit_mae.modeling_vit_mae",
               "hf-swin-simmim": "transformers.models.swin.modeling_swin",
               "hf-hiera-mae": "transformers.models.hiera.modeling_hiera"}


def _cpu_peak_child(queue: Any, threads: int, name: str, setup: Dict[str, Any], *flags: Any) -> None:
    torch.set_num_threads(threads)
    if name in ROW_IMPORTS:
        importlib.import_module(ROW_IMPORTS[name])
    cpu, row_setup = torch.device("cpu"), Setup(**setup)
    images = bench_images(row_setup, cpu)
    with PeakMemory(cpu) as memory:
        build_and_warm_up(name, row_setup, images, cpu, *flags)
    queue.put(memory.peak_mb)


def isolated_cpu_peak_mb(name: str, setup: Setup, precision: str, warmup: int, grad_checkpointing: bool,
                         compile_model: bool) -> float:
    """A row's CPU peak memory (RSS rise while building it and running its warm-up steps) measured in a fresh process:
    in the benchmark's own process rows would reuse pages freed by earlier rows and the peaks would not compare."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_cpu_peak_child, args=(queue, torch.get_num_threads(), name, asdict(setup),
                                                          precision, warmup, grad_checkpointing, compile_model))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"the memory measurement of row '{name}' failed (exit code {child.exitcode})")
    return queue.get(timeout=10)


def prepare_trial(name: str, setup: Setup, images: torch.Tensor, device: torch.device, precision: str, warmup: int,
                  grad_checkpointing: bool = False, compile_model: bool = False) -> Trial:
    """A contender built and warmed up in this process, with its peak memory: the CUDA allocator's here, or on CPU
    that of the same build and warm-up in a process of its own."""
    flags = (precision, warmup, grad_checkpointing, compile_model)
    if device.type == "cpu":
        peak_mb = isolated_cpu_peak_mb(name, setup, *flags)
        run, flops = build_and_warm_up(name, setup, images, device, *flags)
    else:
        release_memory(device)
        with PeakMemory(device) as memory:
            run, flops = build_and_warm_up(name, setup, images, device, *flags)
        peak_mb = memory.peak_mb
    return Trial(name, run, flops, peak_mb)


def measure_models(names: Sequence[str], setup: Setup, device: torch.device, precision: str, steps: int,
                   warmup: int, grad_checkpointing: bool = False, compile_model: bool = False) -> tuple:
    """Timed steps of all contenders interleaved round by round (with a GEMM probe each round), so a busy or
    throttling machine slows every row alike; returns (rows, GEMM ceiling FLOP/s = best probe).

    On CPU, `mfu_cpu_time` divides by the step's CPU time per thread instead of wall time: the MFU the step would
    reach with the cores to itself (spinning threads count as busy, so it errs low)."""
    images = bench_images(setup, device)
    trials = [prepare_trial(name, setup, images, device, precision, warmup, grad_checkpointing, compile_model)
              for name in names]
    ceiling = gemm_ceiling(device, precision)
    for _ in range(steps):
        for trial in trials:
            seconds, cpu_seconds, loss = train_step(trial.run, images, device, precision)
            trial.times.append(seconds)
            trial.cpu_times.append(cpu_seconds)
            trial.losses.append(loss)
        ceiling = max(ceiling, gemm_ceiling(device, precision, repeats=1))
    rows, threads = [], torch.get_num_threads()
    for trial in trials:
        step, cpu_step = statistics.median(trial.times), statistics.median(trial.cpu_times)
        rows.append(Row(trial.name, images_per_s=setup.batch / step, step_ms=step * 1e3,
                        cpu_ms=cpu_step * 1e3 if device.type == "cpu" else None,
                        mfu_cpu_time=trial.flops / (cpu_step / threads) / ceiling if device.type == "cpu" else None,
                        peak_mem_mb=trial.peak_mem_mb, gflops_per_image=trial.flops / setup.batch / 1e9,
                        mfu=trial.flops / step / ceiling, loss=float(torch.stack(trial.losses).float().mean())))
    return rows, ceiling
