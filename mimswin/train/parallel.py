"""How the model is spread over ranks, decided in one place (`train.strategy`): DDP (accelerate's wrapper: every rank
holds the whole model) or FSDP2 (torch's `fully_shard`, per transformer block then at the root: parameters,
gradients and optimizer state sharded). What needs the whole model goes through the calls below, which every rank
makes alike; the model code never asks which strategy runs."""

from __future__ import annotations

import functools
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from timm.models.hiera import HieraBlock
from timm.models.swin_transformer import SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from mimswin.config import TrainConfig
from mimswin.errors import ConfigError, TrainingError
from mimswin.models.cross_decoder import CrossBlock

# The modules FSDP2 shards one by one, each gathered for its own forward and backward: the transformer blocks of every
# family, encoder and decoder alike. Everything else (embeddings, norms, heads, mask tokens) is the root's group.
SHARD_UNITS: Tuple[type, ...] = (Block, SwinTransformerBlock, HieraBlock, CrossBlock)
# Methods other than `forward` through which an encoder runs a unit (models/swin.py: visible tokens only); FSDP is
# told to gather the unit's parameters around them too.
UNIT_METHODS = ("forward_visible",)
T = TypeVar("T")


def shard_units(model: nn.Module) -> List[nn.Module]:
    """The transformer blocks of `model`, in module order."""
    return [module for module in model.modules() if isinstance(module, SHARD_UNITS)]


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is the root of a model FSDP sharded."""
    return isinstance(model, FSDPModule)


def holds_shards(model: nn.Module) -> bool:
    """Whether `model` is, or wraps, a module FSDP sharded: its forward is then a collective."""
    return any(isinstance(module, FSDPModule) for module in model.modules())


def single_process_group(device: torch.device) -> None:
    """FSDP needs a process group even for one process (e.g. a 2-rank run resumed on one): an in-memory group of one."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)


def shard(model: nn.Module, cfg: TrainConfig, accelerator: Accelerator) -> nn.Module:
    """FSDP2: every block of `SHARD_UNITS` its own group, then the root. With bf16, blocks compute on bf16 copies of
    their parameters and reduce gradients in fp32; the root leaves its inputs as they are (pixel targets stay fp32)
    and its forward runs under autocast, as accelerate does for a model it wraps."""
    units = shard_units(model)
    if not units:
        raise ConfigError(f"config key 'train.strategy': fsdp found no transformer block in {type(model).__name__} "
                          f"to shard (known: {', '.join(t.__name__ for t in SHARD_UNITS)})")
    single_process_group(accelerator.device)
    persistent = set(model.state_dict())
    mesh = init_device_mesh(accelerator.device.type, (accelerator.num_processes,))
    bf16 = cfg.mixed_precision == "bf16"
    precision = dict(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else {}
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward,
                    mp_policy=MixedPrecisionPolicy(**precision))
        for method in UNIT_METHODS:
            if hasattr(unit, method):
                register_fsdp_forward_method(unit, method)
    fully_shard(model, mesh=mesh, reshard_after_forward=cfg.reshard_after_forward,
                mp_policy=MixedPrecisionPolicy(**precision, cast_forward_inputs=False))
    if bf16:
        model.forward = autocast_forward(model.forward, accelerator)
    buffers = [buffer for name, buffer in model.named_buffers() if name in persistent]
    if buffers and accelerator.num_processes > 1:
        model.register_forward_pre_hook(functools.partial(broadcast_buffers, buffers))
    return model


def broadcast_buffers(buffers: List[torch.Tensor], module: nn.Module, args: tuple) -> None:
    """Before each training forward, rank 0's copy of the buffers a checkpoint keeps (BatchNorm statistics, e.g. the
    online probe's), as DDP does: ranks and resumed runs then agree on them."""
    if module.training:
        for buffer in buffers:
            dist.broadcast(buffer, src=0)


def autocast_forward(forward, accelerator: Accelerator):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        with accelerator.autocast():
            return forward(*args, **kwargs)
    return run


def parallelize(model: nn.Module, cfg: TrainConfig, accelerator: Accelerator) -> nn.Module:
    """The model the loop trains: accelerate's DDP wrapper, or the model itself sharded in place by FSDP2. Build the
    optimizer afterwards, from `unwrap(accelerator, model)`: sharding replaces the parameters."""
    if cfg.strategy == "fsdp":
        return shard(model, cfg, accelerator)
    return accelerator.prepare_model(model)


def unwrap(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The model's own module (under FSDP the sharded model is that module)."""
    return model if is_sharded(model) else accelerator.unwrap_model(model)


def sync_gradients(model: nn.Module, sync: bool) -> None:
    """FSDP: reduce-scatter gradients only at the last micro-batch of an accumulation window (DDP: accelerate's
    `accumulate` already skips the all-reduce in between)."""
    if is_sharded(model):
        model.set_requires_gradient_sync(sync)


def local_value(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a value FSDP computes as a DTensor (the gradient norm over sharded gradients)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def gather_state_dict(accelerator: Accelerator, model: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """The whole model's state dict on rank 0 (on CPU), None elsewhere. A collective under FSDP: every rank calls it."""
    if is_sharded(model):
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return full if accelerator.is_main_process else None
    if not accelerator.is_main_process:
        return None
    return {k: v.detach().cpu() for k, v in unwrap(accelerator, model).state_dict().items()}


def lockstep(batches: Iterable[T], accelerator: Accelerator, model: nn.Module) -> Iterator[Tuple[T, bool]]:
    """(batch, real) pairs. Under FSDP each forward is a collective, so every rank runs as many as the rank with the
    most batches: a rank whose share is used up repeats its last batch, marked not real (to be run, not counted).
    Elsewhere each batch as it comes, real."""
    if not holds_shards(model) or accelerator.num_processes == 1:
        yield from ((batch, True) for batch in batches)
        return
    source, last = iter(batches), None
    while True:
        batch = next(source, None)
        pending = accelerator.reduce(torch.tensor(float(batch is not None), device=accelerator.device), "sum")
        if not pending.item():  # a host sync per batch: evaluation only
            return
        if batch is not None:
            last = batch
            yield batch, True
        elif last is None:
            raise TrainingError(f"rank {accelerator.process_index} has no evaluation batch while other ranks do: "
                                "the evaluation set is smaller than the number of processes")
        else:
            yield last, False
