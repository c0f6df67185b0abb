"""Each speed switch computes the same step as without it, within a stated tolerance (no timing here)."""

import copy

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from conftest import TINY_OVERRIDES, TINY_PRESET, preset_channels

from mimswin.config import OptimConfig, PretrainConfig, load_config
from mimswin.errors import ConfigError
from mimswin.models import build_method
from mimswin.models.masking import random_mask, with_predicted_subset
from mimswin.programs.pretrain import build_trainer
from mimswin.train.optim import build_optimizer
from mimswin.train.perf import apply_model_flags, enable_grad_checkpointing, optimizer_kwargs

C = preset_channels()  # channels the tiny presets read

# fp32 paths that only reorder or recompute the same math: tight; bf16 autocast rounds matmul inputs to 8 bits.
EXACT_TOL = dict(rtol=1e-5, atol=1e-6)
COMPILE_TOL = dict(rtol=1e-4, atol=1e-5)
BF16_REL_TOL = 2e-2


@pytest.fixture
def mae():
    torch.manual_seed(0)
    return build_method(load_config(PretrainConfig, [TINY_PRESET], TINY_OVERRIDES + ["model.drop_path_rate=0.1"]))


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(4, C, 32, 32, generator=generator)
    return images, random_mask(4, 64, 0.75, generator=generator)


def loss_and_grads(model, images, mask, seed=5):
    """One forward/backward under a fixed seed (drop path draws from it); grads by parameter name."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = model(images, mask).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got, want, tol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], **tol, msg=name)


@pytest.mark.parametrize("decoder", [[], ["decoder.kind=cross", "decoder.predict_ratio=0.5",
                                          "decoder.feature_blocks=[0, -1]"]], ids=["self", "cross"])
def test_grad_checkpointing_gives_the_same_loss_and_grads(decoder, batch):
    torch.manual_seed(0)
    mae = build_method(load_config(PretrainConfig, [TINY_PRESET], TINY_OVERRIDES + ["model.drop_path_rate=0.1",
                                                                                     *decoder]))
    batch = batch[0], with_predicted_subset(batch[1], mae.predict_ratio, torch.Generator().manual_seed(2))
    plain_loss, plain_grads = loss_and_grads(mae, *batch)
    assert enable_grad_checkpointing(mae) == 2
    assert mae.encoder.model.grad_checkpointing and mae.decoder.grad_checkpointing
    ckpt_loss, ckpt_grads = loss_and_grads(mae, *batch)
    torch.testing.assert_close(ckpt_loss, plain_loss, **EXACT_TOL)
    assert_same_grads(ckpt_grads, plain_grads, EXACT_TOL)


def test_compiled_model_gives_the_same_loss_and_grads(batch):
    torch.manual_seed(0)
    mae = build_method(load_config(PretrainConfig, [TINY_PRESET], TINY_OVERRIDES + ["model.kwargs={depth: 1}"]))
    eager_loss, eager_grads = loss_and_grads(mae, *batch)
    compiled = copy.deepcopy(mae)
    compiled.compile()
    compiled_loss, compiled_grads = loss_and_grads(compiled, *batch)
    torch.testing.assert_close(compiled_loss, eager_loss, **COMPILE_TOL)
    assert_same_grads(compiled_grads, eager_grads, COMPILE_TOL)
    assert compiled.state_dict().keys() == mae.state_dict().keys()


def test_bf16_mixed_precision_loss_is_within_two_percent_of_fp32(mae, batch):
    mae.eval()
    images, mask = batch
    with torch.no_grad():
        fp32 = mae(images, mask).loss
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        model = Accelerator(cpu=True, mixed_precision="bf16").prepare(mae)
        with torch.no_grad():
            bf16 = model(images, mask).loss
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert not torch.equal(bf16, fp32)
    assert abs(bf16.item() - fp32.item()) <= BF16_REL_TOL * fp32.item(), (bf16.item(), fp32.item())


def test_fused_adamw_takes_the_same_steps_as_the_default_kernel(mae, batch):
    """Both kernels get the same gradients each step (so rounding cannot feed back through the model)."""
    cfg = OptimConfig()
    fused_model = copy.deepcopy(mae)
    plain_opt = build_optimizer(mae, cfg, 1e-3)
    fused_opt = build_optimizer(fused_model, cfg, 1e-3,
                                **optimizer_kwargs(OptimConfig(fused=True), torch.device("cpu")))
    start = mae.decoder.pred.weight.detach().clone()
    assert fused_opt.defaults["fused"] and not plain_opt.defaults["fused"]
    for step in range(3):
        _, grads = loss_and_grads(mae, *batch, seed=step)
        for name, param in fused_model.named_parameters():
            param.grad = grads[name].clone() if name in grads else None
        plain_opt.step()
        fused_opt.step()
    for (name, want), got in zip(mae.named_parameters(), fused_model.parameters()):
        torch.testing.assert_close(got, want, **EXACT_TOL, msg=name)
    assert not torch.allclose(fused_model.decoder.pred.weight, start)


def test_fused_adamw_is_the_cuda_and_cpu_default_and_explicit_setting_wins():
    assert optimizer_kwargs(OptimConfig(), torch.device("cuda")) == {"fused": True}
    assert optimizer_kwargs(OptimConfig(), torch.device("cpu")) == {"fused": True}
    assert optimizer_kwargs(OptimConfig(), torch.device("meta")) == {}
    assert optimizer_kwargs(OptimConfig(fused=False), torch.device("cuda")) == {}
    assert optimizer_kwargs(OptimConfig(fused=False), torch.device("cpu")) == {}


def test_grad_checkpointing_on_a_model_without_support_is_one_clear_error():
    with pytest.raises(ConfigError, match="train.activation_checkpointing"):
        enable_grad_checkpointing(torch.nn.Linear(2, 2))


def test_pretrain_config_switches_reach_the_model_and_optimizer(tmp_path):
    cfg = load_config(PretrainConfig, [TINY_PRESET], TINY_OVERRIDES + [
        "train.grad_checkpointing=true", "optim.fused=true", f"train.output_dir={tmp_path / 'run'}"])
    trainer = build_trainer(cfg)
    method = trainer.accelerator.unwrap_model(trainer.model)
    assert method.encoder.model.grad_checkpointing and method.decoder.grad_checkpointing
    assert trainer.optimizer.optimizer.defaults["fused"]
    trainer.accelerator.end_training()


def test_compile_flag_compiles_in_place_keeping_state_dict_keys(mae):
    keys = list(mae.state_dict())
    cfg = load_config(PretrainConfig, [TINY_PRESET], TINY_OVERRIDES + ["train.compile=true"]).train
    assert apply_model_flags(mae, cfg) is mae
    assert mae._compiled_call_impl is not None
    assert list(mae.state_dict()) == keys


@pytest.mark.parametrize("preset", ["tiny_mae_swin_cpu", "tiny_simmim_swin_cpu"])
def test_swin_grad_checkpointing_recomputes_blocks_and_gives_the_same_grads(preset):
    torch.manual_seed(0)
    model = build_method(load_config(PretrainConfig, [preset], ["model.drop_path_rate=0.1"]))
    images = torch.randn(2, C, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = model.draw_mask(2, torch.device("cpu"), torch.Generator().manual_seed(2))
    block = model.encoder.model.layers[0].blocks[0]
    calls = []
    block.norm1.register_forward_pre_hook(lambda *_: calls.append(1))  # block's first op: recompute may stop early
    plain_loss, plain_grads = loss_and_grads(model, images, mask)
    plain_calls, calls[:] = len(calls), []
    assert plain_calls == 1
    enable_grad_checkpointing(model)
    ckpt_loss, ckpt_grads = loss_and_grads(model, images, mask)
    assert len(calls) == 2 * plain_calls, "the checkpointed block must run again in backward"
    torch.testing.assert_close(ckpt_loss, plain_loss, **EXACT_TOL)
    assert_same_grads(ckpt_grads, plain_grads, EXACT_TOL)
