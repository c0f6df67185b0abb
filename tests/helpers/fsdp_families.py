"""Run under `torchrun --nproc_per_node 2` on CPU: for each MIM family (MAE ViT with the self and the cross decoder,
visible-only MAE Swin, SimMIM Swin, MAE Hiera), shard the method with mimswin's FSDP strategy and take two AdamW steps
on one batch, beside an unsharded copy taking the same steps; print one JSON line per family (sharded units, losses of
both, grad-norm of both), and one for `lockstep` over shares of unequal length."""

import copy
import json
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from mimswin.config import PretrainConfig, load_config  # noqa: E402
from mimswin.models import build_method  # noqa: E402
from mimswin.train.parallel import local_value, lockstep, shard, shard_units  # noqa: E402
from mimswin.train.perf import enable_grad_checkpointing  # noqa: E402

FAMILIES = {  # preset, overrides, train overrides
    "mae_vit": ("tiny_mae_vit_cpu", ["model.img_size=32", "model.kwargs={depth: 2}", "decoder.depth=1"], []),
    "mae_vit_bf16": ("tiny_mae_vit_cpu", ["model.img_size=32", "model.kwargs={depth: 2}", "decoder.depth=1"],
                     ["train.mixed_precision=bf16"]),
    "mae_vit_cross": ("tiny_mae_vit_cpu", ["model.img_size=32", "model.kwargs={depth: 2}", "decoder.kind=cross",
                                           "decoder.depth=2", "decoder.predict_ratio=0.5",
                                           "decoder.feature_blocks=[0,1]"], []),
    "mae_swin": ("tiny_mae_swin_cpu", [], ["train.activation_checkpointing=true"]),
    "simmim_swin": ("tiny_simmim_swin_cpu", [], ["train.reshard_after_forward=false"]),
    "mae_hiera": ("tiny_mae_hiera_cpu", [], []),
}


def steps(method: torch.nn.Module, images: torch.Tensor, mask, accelerator: Accelerator, bf16: bool) -> dict:
    """Two AdamW steps on one batch: losses before each step and after, and the first step's gradient norm."""
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    losses, norms = [], []
    for _ in range(2):
        with accelerator.autocast() if bf16 else torch.autocast("cpu", enabled=False):
            loss = method(images, mask).loss
        loss.backward()
        norms.append(local_value(torch.nn.utils.clip_grad_norm_(method.parameters(), 1e9)).item())
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(method(images, mask).loss.item())
    return {"losses": losses, "norms": norms}


def main() -> None:
    accelerator = Accelerator(cpu=True, mixed_precision="bf16")  # autocast where a family asks for bf16
    for family, (preset, overrides, train) in FAMILIES.items():
        cfg = load_config(PretrainConfig, [preset], overrides + train + ["train.strategy=fsdp"])
        bf16 = cfg.train.mixed_precision == "bf16"
        torch.manual_seed(0)
        method = build_method(cfg)
        if cfg.train.activation_checkpointing:
            enable_grad_checkpointing(method)
        reference = copy.deepcopy(method)
        units = [name for name, module in method.named_modules() if module in shard_units(method)]
        shard(method, cfg.train, accelerator)
        torch.manual_seed(1)
        size = cfg.model.img_size
        images = torch.randn(4, cfg.data.channels, size, size)
        mask = method.draw_mask(4, torch.device("cpu"), torch.Generator().manual_seed(2))
        result = {"family": family, "world": accelerator.num_processes, "units": units,
                  "sharded": steps(method, images, mask, accelerator, bf16),
                  "whole": steps(reference, images, mask, accelerator, bf16)}
        if accelerator.is_main_process:
            print(json.dumps(result), flush=True)
    share = [[0, 1, 2], [10]][accelerator.process_index]  # rank 0 has three batches, rank 1 one
    paced = list(lockstep(share, accelerator, method))
    everyone = gather_object([{"lockstep": paced, "rank": accelerator.process_index}])  # rank 0 prints them all:
    if accelerator.is_main_process:  # two ranks' prints can share a line
        for line in everyone:
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
