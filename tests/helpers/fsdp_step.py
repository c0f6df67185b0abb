"""Run under `torchrun --nproc_per_node 2` on CPU: shard a tiny MAE as an FSDP config file says, take one step on the
same batch on every rank and print one JSON line comparing it with the same step on an unsharded copy."""

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]
from conftest import TINY_OVERRIDES, TINY_PRESET  # noqa: E402

from mimswin.config import PretrainConfig, load_config  # noqa: E402
from mimswin.models import build_method  # noqa: E402


def plugin_from(config_file: str) -> FullyShardedDataParallelPlugin:
    """The plugin `accelerate launch --config_file` would build (keys as accelerate writes them, minus `fsdp_`)."""
    options = load_config_from_file(config_file).fsdp_config
    return FullyShardedDataParallelPlugin(
        fsdp_version=options["fsdp_version"], auto_wrap_policy=options["fsdp_auto_wrap_policy"].lower(),
        transformer_cls_names_to_wrap=options["fsdp_transformer_layer_cls_to_wrap"].split(","),
        reshard_after_forward=options["fsdp_reshard_after_forward"])


def main(config_file: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    cfg = load_config(PretrainConfig, [TINY_PRESET], [o for o in TINY_OVERRIDES if o.startswith(("model", "decoder"))])
    torch.manual_seed(0)
    model = build_method(cfg)
    reference = copy.deepcopy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin_from(config_file), model)
    wrapped = [name for name, module in model.named_modules() if policy(module)]
    for name, module in model.named_modules():
        if policy(module):
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)

    torch.manual_seed(1)
    images = torch.randn(4, cfg.data.channels, cfg.model.img_size, cfg.model.img_size)
    mask = model.draw_mask(4, torch.device("cpu"), torch.Generator().manual_seed(2))
    losses = {}
    for label, net in (("sharded", model), ("reference", reference)):
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
        net(images, mask).loss.backward()
        optimizer.step()
        with torch.no_grad():
            losses[label] = net(images, mask).loss.item()
    if dist.get_rank() == 0:
        print(json.dumps({"wrapped": wrapped, "world": dist.get_world_size(), **losses}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
