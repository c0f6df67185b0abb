"""Pretraining throughput benchmark: mimswin MAE and SimMIM vs HuggingFace ViTMAE and Swin SimMIM vs the data loader vs
the device's GEMM ceiling.

Every row is measured in one process at the same model size, image size, batch and mask ratio. A step is forward,
backward, AdamW step and zero_grad on a fixed batch on the device; step time is the median of `--steps` after
`--warmup`. FLOPs per step are counted by `torch.utils.flop_counter` (forward + backward), MFU is those FLOPs per
second over a matmul ceiling measured in the same run (fp32 on CPU, bf16 on GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import json
import multiprocessing
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from mimswin.config import PretrainConfig, load_config
from mimswin.errors import ConfigError, MimswinError
from mimswin.models import build_method
from mimswin.models.vit import create_timm_encoder
from mimswin.train.optim import build_optimizer
from mimswin.train.perf import enable_grad_checkpointing, optimizer_kwargs

VIT_ROWS = ("mimswin-mae", "hf-vitmae")
SWIN_ROWS = ("mimswin-simmim-swin", "mimswin-mae-swin", "hf-swin-simmim")
ROW_NAMES = (*VIT_ROWS, *SWIN_ROWS, "loader")
ROW_GROUPS = {"vit": VIT_ROWS, "swin": SWIN_ROWS, "all": ROW_NAMES}
HF_ROWS = ("hf-vitmae", "hf-swin-simmim")
# (ratio name, numerator row, denominator row): images/s of the first over the second.
RATIOS = (("mimswin_over_hf", "mimswin-mae", "hf-vitmae"),
          ("swin_visible_over_simmim", "mimswin-mae-swin", "mimswin-simmim-swin"),
          ("swin_simmim_mimswin_over_hf", "mimswin-simmim-swin", "hf-swin-simmim"),
          ("swin_visible_over_hf_simmim", "mimswin-mae-swin", "hf-swin-simmim"),
          ("loader_over_model", "loader", "mimswin-mae"))


@dataclass
class Setup:
    """One benchmark configuration: the shared model size, input and batch of every row."""

    encoder: str
    img_size: int
    patch_size: int
    depth: int
    decoder_dim: int
    decoder_depth: int
    decoder_heads: int
    batch: int
    mask_ratio: float = 0.75
    swin: str = "swin_tiny_patch4_window7_224"
    swin_patch_size: Optional[int] = None
    swin_kwargs: Dict[str, Any] = field(default_factory=dict)
    simmim_unit: int = 32
    swin_decoder_depth: int = 1


# The Swin rows share image size, batch, mask ratio and decoder width with the ViT rows; the visible-only MAE's decoder
# has the single block of the mae_swin_* presets (GreenMIM's choice). SimMIM hides `simmim_unit` px squares (SimMIM's
# 32 px; 8 px at 32 px), visible-only MAE whole cells (the Swin's output stride).
TINY_SWIN = {"embed_dim": 32, "depths": [2, 2], "num_heads": [2, 4], "window_size": 4}
PRESETS: Dict[str, Setup] = {
    # ~1 minute on 2 CPU cores: ViT-Tiny width, 6 blocks, 8x8 patch grid at 32 px, 2-block 128-d decoder; the 2-stage
    # Swin of configs/pretrain/tiny_mae_swin_cpu.yaml (patch 2, window 4, dims 32/64).
    "tiny": Setup("vit_tiny_patch16_224", 32, 4, 6, 128, 2, 4, batch=32, swin_patch_size=2, swin_kwargs=TINY_SWIN,
                  simmim_unit=8),
    # The CPU comparison of the issue: full ViT-Tiny/16 at 224 with MAE's default 512-d 8-block decoder; Swin-T.
    "cpu": Setup("vit_tiny_patch16_224", 224, 16, 12, 512, 8, 16, batch=16),
    # The GPU comparison: ViT-B/16 and Swin-B at 224, MAE's default decoder, 128 images per device.
    "gpu": Setup("vit_base_patch16_224", 224, 16, 12, 512, 8, 16, batch=128, swin="swin_base_patch4_window7_224"),
}


@dataclass
class Row:
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
    device: str
    device_name: str
    precision: str
    threads: int
    setup: Dict[str, Any]
    gemm_tflops: float
    rows: List[Row] = field(default_factory=list)
    ratios: Dict[str, float] = field(default_factory=dict)


def mimswin_config(setup: Setup) -> PretrainConfig:
    """The PretrainConfig of a setup, built through the same loader as a real run."""
    overrides = [f"model.name={setup.encoder}", f"model.img_size={setup.img_size}",
                 f"model.patch_size={setup.patch_size}", f"model.kwargs={{depth: {setup.depth}}}",
                 f"mask.ratio={setup.mask_ratio}", f"decoder.dim={setup.decoder_dim}",
                 f"decoder.depth={setup.decoder_depth}", f"decoder.heads={setup.decoder_heads}",
                 f"data.batch_size={setup.batch}"]
    return load_config(PretrainConfig, [], overrides)


def swin_config(setup: Setup, method: str) -> PretrainConfig:
    """The PretrainConfig of a setup's Swin for `simmim` (L1 on raw pixels, as SimMIM) or visible-only `mae`."""
    overrides = [f"method={method}", f"model.name={setup.swin}", f"model.img_size={setup.img_size}",
                 f"model.kwargs={json.dumps(setup.swin_kwargs)}", f"mask.ratio={setup.mask_ratio}",
                 f"decoder.dim={setup.decoder_dim}", f"decoder.depth={setup.swin_decoder_depth}",
                 f"decoder.heads={setup.decoder_heads}", f"data.batch_size={setup.batch}"]
    if setup.swin_patch_size is not None:
        overrides.append(f"model.patch_size={setup.swin_patch_size}")
    if method == "simmim":
        overrides += [f"mask.unit={setup.simmim_unit}", "loss.norm_pix=false", "loss.kind=l1"]
    return load_config(PretrainConfig, [], overrides)


@dataclass
class Contender:
    """A model under test: its loss on a batch, its optimizer and its own switch for gradient checkpointing."""

    model: torch.nn.Module
    loss_fn: Callable[[torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    enable_checkpointing: Callable[[], Any]


def build_mimswin(setup: Setup, device: torch.device, cfg: Optional[PretrainConfig] = None) -> Contender:
    """mimswin's method of `cfg` (default: MAE ViT) with the optimizer `pretrain` builds (fused AdamW on CUDA)."""
    cfg = cfg or mimswin_config(setup)
    model = build_method(cfg).to(device)
    optimizer = build_optimizer(model, cfg.optim, 1e-4, **optimizer_kwargs(cfg.optim, device))
    return Contender(model, lambda images: model(images).loss, optimizer, lambda: enable_grad_checkpointing(model))


def build_hf_vitmae(setup: Setup, device: torch.device) -> Contender:
    """transformers' ViTMAEForPreTraining at the same size, with SDPA attention, norm-pix loss and the same AdamW."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    ref = mimswin_config(setup)
    block = build_method(ref).encoder.model.blocks[0]
    config = ViTMAEConfig(
        hidden_size=block.attn.qkv.in_features, num_hidden_layers=setup.depth,
        num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.fc1.out_features,
        image_size=setup.img_size, patch_size=setup.patch_size, layer_norm_eps=1e-6, qkv_bias=True,
        decoder_hidden_size=setup.decoder_dim, decoder_num_hidden_layers=setup.decoder_depth,
        decoder_num_attention_heads=setup.decoder_heads,
        decoder_intermediate_size=int(setup.decoder_dim * ref.decoder.mlp_ratio), mask_ratio=setup.mask_ratio,
        norm_pix_loss=True, attn_implementation="sdpa")
    model = ViTMAEForPreTraining(config).to(device)
    optimizer = build_optimizer(model, ref.optim, 1e-4, **optimizer_kwargs(ref.optim, device))
    return Contender(model, lambda images: model(pixel_values=images).loss, optimizer,
                     model.gradient_checkpointing_enable)


def build_mimswin_simmim_swin(setup: Setup, device: torch.device) -> Contender:
    """mimswin's SimMIM: the whole Swin on all tokens, mask token on hidden ones, L1 on raw pixels."""
    return build_mimswin(setup, device, swin_config(setup, "simmim"))


def build_mimswin_mae_swin(setup: Setup, device: torch.device) -> Contender:
    """mimswin's visible-only Swin MAE: the Swin on visible cells only, then the MAE decoder."""
    return build_mimswin(setup, device, swin_config(setup, "mae"))


def build_hf_swin_simmim(setup: Setup, device: torch.device) -> Contender:
    """transformers' SwinForMaskedImageModeling with the timm Swin's sizes, hiding the same share of the same units as
    mimswin's SimMIM (exactly `mask_ratio` of them per image, drawn on the device each step), the same AdamW."""
    from transformers import SwinConfig, SwinForMaskedImageModeling

    ref = swin_config(setup, "simmim")
    m = ref.model
    swin = create_timm_encoder(m.name, m.img_size, m.patch_size, m.drop_path_rate, m.kwargs)
    patch, stages = swin.patch_embed.patch_size[0], len(swin.layers)
    config = SwinConfig(image_size=setup.img_size, patch_size=patch, embed_dim=swin.embed_dim,
                        depths=[len(stage.blocks) for stage in swin.layers],
                        num_heads=[stage.blocks[0].attn.num_heads for stage in swin.layers],
                        window_size=swin.layers[0].blocks[0].window_size[0], drop_path_rate=0.0,
                        encoder_stride=patch * 2 ** (stages - 1))
    model = SwinForMaskedImageModeling(config).to(device)
    optimizer = build_optimizer(model, ref.optim, 1e-4, **optimizer_kwargs(ref.optim, device))
    grid, unit = setup.img_size // patch, setup.simmim_unit // patch
    units = (grid // unit) ** 2
    hidden_count = round(setup.mask_ratio * units)

    def loss_fn(images: torch.Tensor) -> torch.Tensor:
        rank = torch.rand(images.shape[0], units, device=images.device).argsort(1).argsort(1)
        hidden = (rank < hidden_count).view(-1, grid // unit, grid // unit)
        hidden = hidden.repeat_interleave(unit, 1).repeat_interleave(unit, 2).flatten(1)
        return model(pixel_values=images, bool_masked_pos=hidden).loss

    return Contender(model, loss_fn, optimizer, model.gradient_checkpointing_enable)


BUILDERS: Dict[str, Callable[[Setup, torch.device], Contender]] = {
    "mimswin-mae": build_mimswin, "hf-vitmae": build_hf_vitmae, "mimswin-simmim-swin": build_mimswin_simmim_swin,
    "mimswin-mae-swin": build_mimswin_mae_swin, "hf-swin-simmim": build_hf_swin_simmim}


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
               "hf-swin-simmim": "transformers.models.swin.modeling_swin"}


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


def measure_loader(setup: Setup, device: torch.device, steps: int, warmup: int, num_workers: int) -> Row:
    """Images/s of the pretraining data path alone (embedded MNIST, MAE augmentations, batches on the device)."""
    from mimswin.data.build import build_pretrain_data

    cfg = mimswin_config(setup)
    cfg.data.num_workers = num_workers
    data = build_pretrain_data(cfg.data, setup.img_size, 1, 0, 0, device)
    batches = data.epoch(0)
    count = min(warmup + steps, data.batches_per_epoch)
    start = time.perf_counter()
    for index in range(count):
        if index == warmup:
            synchronize(device)
            start = time.perf_counter()
        next(batches)
    synchronize(device)
    timed = max(1, count - warmup)
    elapsed = time.perf_counter() - start
    return Row("loader", images_per_s=setup.batch * timed / elapsed, step_ms=elapsed / timed * 1e3,
               note=f"embedded MNIST-5k, {num_workers} worker(s)")


def run_benchmark(setup: Setup, device: torch.device, precision: str, steps: int, warmup: int,
                  rows: Sequence[str] = ROW_NAMES, grad_checkpointing: bool = False, compile_model: bool = False,
                  num_workers: int = 2) -> Report:
    """Measure every requested row and the GEMM ceiling in this process; rows keep the requested order."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    models = [row for row in rows if row in BUILDERS]
    if importlib.util.find_spec("transformers") is None:
        models = [row for row in models if row not in HF_ROWS]
    measured = {"loader": measure_loader(setup, device, steps, warmup, num_workers)} if "loader" in rows else {}
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


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "cpu"


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


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="mimswin-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="model size, image size, batch")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None,
                        help="default: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="override the preset's batch size")
    parser.add_argument("--decoder-depth", type=int, default=None,
                        help="override the preset's MAE decoder blocks (ViT rows, HF ViTMAE and visible-only Swin)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per row (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per row first")
    parser.add_argument("--rows", default="all", help=f"comma list of rows ({', '.join(ROW_NAMES)}) or groups "
                        f"({', '.join(ROW_GROUPS)})")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model row")
    parser.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing in every model row")
    parser.add_argument("--num-workers", type=int, default=2, help="loader row worker processes")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this path ('-' = stdout)")
    return parser.parse_args(argv)


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: unknown device '{name}'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: only cpu and cuda are supported, got '{name}'")
    return device


def select_rows(spec: str) -> List[str]:
    """Row names of a comma list of rows and groups, groups expanded, each row once in the order first named."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = sorted(set(names) - set(ROW_NAMES) - set(ROW_GROUPS))
    if unknown or not names:
        raise ConfigError(f"--rows: unknown row(s) {unknown} (known: {', '.join((*ROW_NAMES, *ROW_GROUPS))})")
    rows = [row for name in names for row in ROW_GROUPS.get(name, (name,))]
    return list(dict.fromkeys(rows))


def main(argv: Optional[Sequence[str]] = None) -> Report:
    """Parse, measure, print the table (and JSON when asked); returns the report."""
    args = parse_args(argv)
    device = resolve_device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    rows = select_rows(args.rows)
    if args.steps < 1 or args.warmup < 0:
        raise ConfigError("--steps must be >= 1 and --warmup >= 0")
    setup = PRESETS[args.preset]
    if args.batch is not None:
        if args.batch < 1:
            raise ConfigError(f"--batch must be positive, got {args.batch}")
        setup = Setup(**{**asdict(setup), "batch": args.batch})
    if args.decoder_depth is not None:
        if args.decoder_depth < 1:
            raise ConfigError(f"--decoder-depth must be positive, got {args.decoder_depth}")
        setup = Setup(**{**asdict(setup), "decoder_depth": args.decoder_depth,
                         "swin_decoder_depth": args.decoder_depth})
    report = run_benchmark(setup, device, precision, args.steps, args.warmup, rows, args.grad_checkpointing,
                           args.compile, args.num_workers)
    print(format_table(report))
    if args.json == "-":
        print(json.dumps(asdict(report), indent=2))
    elif args.json:
        with open(args.json, "w") as out:
            json.dump(asdict(report), out, indent=2)
    return report


def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    try:
        main(argv)
    except MimswinError as err:
        print(f"mimswin: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
