"""Speed and peak memory of Swin masked image modeling: SimMIM (all tokens) vs visible-only MAE, same model/batch/size.

Each variant runs forward + backward for a few steps in its own process (so peak memory is its own) and reports
images/s, peak memory (CUDA allocator peak on GPU; on CPU, growth of the process's peak RSS over its level before the
first step), images per CPU-second of the process (steadier than wall time on a shared CPU; run with --threads 1)
and FLOPs of forward + backward (torch's FlopCounterMode). HuggingFace `SwinForMaskedImageModeling`
(the same Swin, SimMIM-style) is added when transformers is installed.

    python benchmarks/swin_mim.py                       # swin_tiny at 224, batch 8, on GPU if there is one
    python benchmarks/swin_mim.py --batch 4 --steps 2   # quicker on a small CPU
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

VARIANTS = ("simmim", "mae", "hf_simmim")


def build_ours(args: argparse.Namespace, method: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from mimswin.config import PretrainConfig, load_config
    from mimswin.models import build_method

    ratio = args.simmim_ratio if method == "simmim" else args.mask_ratio
    overrides = [f"method={method}", f"model.name={args.model}", f"model.img_size={args.img_size}",
                 f"mask.ratio={ratio}", f"decoder.depth={args.decoder_depth}", "decoder.dim=512", "decoder.heads=16"]
    model = build_method(load_config(PretrainConfig, [], overrides)).to(args.device).train()
    return lambda images: model(images).loss


def build_hf(args: argparse.Namespace) -> Callable[[torch.Tensor], torch.Tensor]:
    import timm
    from transformers import SwinConfig, SwinForMaskedImageModeling

    swin = timm.create_model(args.model, pretrained=False, img_size=args.img_size)
    patch = swin.patch_embed.patch_size[0]
    config = SwinConfig(image_size=args.img_size, patch_size=patch, embed_dim=swin.embed_dim,
                        depths=[len(stage.blocks) for stage in swin.layers],
                        num_heads=[stage.blocks[0].attn.num_heads for stage in swin.layers],
                        window_size=swin.layers[0].blocks[0].window_size[0],
                        encoder_stride=patch * 2 ** (len(swin.layers) - 1))
    model = SwinForMaskedImageModeling(config).to(args.device).train()
    grid, unit = args.img_size // patch, 32 // patch

    def step(images: torch.Tensor) -> torch.Tensor:
        units = (torch.rand(images.shape[0], grid // unit, grid // unit, device=images.device) < args.simmim_ratio)
        hidden = units.repeat_interleave(unit, 1).repeat_interleave(unit, 2).flatten(1)
        return model(pixel_values=images, bool_masked_pos=hidden).loss

    return step


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def measure(args: argparse.Namespace, variant: str) -> Dict[str, float]:
    """images/s and peak memory (MiB) of forward + backward for one variant, in this process."""
    torch.manual_seed(0)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    step = build_hf(args) if variant == "hf_simmim" else build_ours(args, variant)
    images = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
    cuda = args.device.startswith("cuda")
    base = peak_rss_mib()
    for _ in range(args.warmup):
        step(images).backward()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step(images).backward()
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    memory = torch.cuda.max_memory_allocated() / 2 ** 20 if cuda else peak_rss_mib() - base
    with FlopCounterMode(display=False) as counter:
        step(images).backward()
    count = args.batch * args.steps
    return {"images_per_s": count / seconds, "images_per_cpu_s": count / cpu_seconds, "peak_mib": memory,
            "gflop_per_image": counter.get_total_flops() / 1e9 / args.batch}


def run_variant(args: argparse.Namespace, variant: str, queue: multiprocessing.Queue) -> None:
    queue.put(measure(args, variant))


def measure_apart(args: argparse.Namespace, variant: str) -> Dict[str, float]:
    """`measure` in a fresh process, so each variant's peak memory is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=run_variant, args=(args, variant, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="swin_tiny_patch4_window7_224")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="visible-only MAE")
    parser.add_argument("--simmim-ratio", type=float, default=0.6, help="SimMIM (cost does not depend on it)")
    parser.add_argument("--decoder-depth", type=int, default=1, help="MAE decoder blocks (512 wide)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> Dict[str, Dict[str, float]]:
    args = parse_args(argv)
    variants = list(args.variants)
    if "hf_simmim" in variants:
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("transformers not installed: skipping hf_simmim")
            variants.remove("hf_simmim")
    print(f"{args.model} {args.img_size}px batch {args.batch} on {args.device}, forward+backward, {args.steps} "
          f"timed steps; MAE mask {args.mask_ratio}, SimMIM mask {args.simmim_ratio} (32 px units)")
    memory_kind = "CUDA peak allocated" if args.device.startswith("cuda") else "peak RSS growth"
    results = {variant: measure_apart(args, variant) for variant in variants}
    for variant, r in results.items():
        print(f"{variant:>10}: {r['images_per_s']:8.2f} images/s  {r['images_per_cpu_s']:8.2f} images/CPU-s  "
              f"{r['peak_mib']:9.1f} MiB ({memory_kind})  "
              f"{r['gflop_per_image']:7.1f} GFLOP/image")
    if "mae" in results:
        mae = results["mae"]
        for variant in [v for v in results if v != "mae"]:
            other = results[variant]
            memory_ratio = other["peak_mib"] / mae["peak_mib"] if mae["peak_mib"] > 0 else float("nan")
            cpu_ratio = mae["images_per_cpu_s"] / other["images_per_cpu_s"]
            print(f"visible-only MAE vs {variant}: {mae['images_per_s'] / other['images_per_s']:.2f}x images/s, "
                  f"{cpu_ratio:.2f}x images/CPU-s, "
                  f"{memory_ratio:.2f}x less memory, {other['gflop_per_image'] / mae['gflop_per_image']:.2f}x fewer "
                  f"FLOPs")
    return results


if __name__ == "__main__":
    main()
