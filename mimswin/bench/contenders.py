"""The benchmark's contenders: row names, setups (presets), and how each row builds its model, loss and optimizer."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional

import torch

from mimswin.config import PretrainConfig, load_config
from mimswin.models import build_method
from mimswin.models.create import create_timm_encoder
from mimswin.models.masking import MaskSample
from mimswin.train.optim import build_optimizer
from mimswin.train.perf import enable_grad_checkpointing, optimizer_kwargs

VIT_ROWS = ("mimswin-mae", "hf-vitmae")
# mimswin's MAE ViT with the cross decoder (decoder.kind=cross) reconstructing that share of the hidden patches.
CROSS_PREDICT_RATIOS = (0.25, 0.5, 1.0)
CROSS_ROWS = tuple(f"mimswin-mae-cross-{ratio}" for ratio in CROSS_PREDICT_RATIOS)
# The Hiera rows hide Hiera's own share of mask units (0.6, the paper's and HieraConfig's default), not the ViT rows'
# 0.75; their model is the tiny CPU preset's Hiera at the setup's image size, or hiera_tiny_224 (beside ViT-Tiny) /
# hiera_base_224 (beside ViT-B) at 224 px with MAE's q_pool 2; the decoder is the setup's.
HIERA_ROWS = ("mimswin-mae-hiera", "hf-hiera-mae", "mimswin-hiera-all-units")
SWIN_ROWS = ("mimswin-simmim-swin", "mimswin-mae-swin", "hf-swin-simmim")
# The pretraining loader alone, row -> (data.resize, data.decode): crops resized in the workers, on the device, and
# JPEGs decoded on the device too.
LOADER_PLACES = {"loader": ("worker", "worker"), "loader-device": ("device", "worker"),
                 "loader-device-decode": ("device", "device")}
LOADER_ROWS = tuple(LOADER_PLACES)
ROW_NAMES = (*VIT_ROWS, *CROSS_ROWS, *SWIN_ROWS, *HIERA_ROWS, *LOADER_ROWS)
ROW_GROUPS = {"vit": VIT_ROWS, "cross": ("hf-vitmae", "mimswin-mae", *CROSS_ROWS), "swin": SWIN_ROWS,
              "hiera": HIERA_ROWS, "loaders": LOADER_ROWS, "all": ROW_NAMES}
HF_ROWS = ("hf-vitmae", "hf-swin-simmim", "hf-hiera-mae")
# (ratio name, numerator row, denominator row): images/s of the first over the second.
RATIOS = (("mimswin_over_hf", "mimswin-mae", "hf-vitmae"),
          ("swin_visible_over_simmim", "mimswin-mae-swin", "mimswin-simmim-swin"),
          ("swin_simmim_mimswin_over_hf", "mimswin-simmim-swin", "hf-swin-simmim"),
          ("swin_visible_over_hf_simmim", "mimswin-mae-swin", "hf-swin-simmim"),
          ("loader_over_model", "loader", "mimswin-mae"),
          ("loader_device_over_model", "loader-device", "mimswin-mae"),
          ("loader_device_decode_over_model", "loader-device-decode", "mimswin-mae"),
          ("hiera_mimswin_over_hf", "mimswin-mae-hiera", "hf-hiera-mae"),
          ("hiera_masked_over_all_units", "mimswin-mae-hiera", "mimswin-hiera-all-units"),
          *((f"cross_{ratio}_over_hf", row, "hf-vitmae") for ratio, row in zip(CROSS_PREDICT_RATIOS, CROSS_ROWS)),
          *((f"cross_{ratio}_over_self", row, "mimswin-mae") for ratio, row in zip(CROSS_PREDICT_RATIOS, CROSS_ROWS)))


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
    # The decoder comparison on CPU (`--rows cross`): ViT-S/16 and ViT-B/16 at 224 with MAE's default 512-d 8-block
    # decoder, batch 16.
    "vit_s16": Setup("vit_small_patch16_224", 224, 16, 12, 512, 8, 16, batch=16),
    "vit_b16": Setup("vit_base_patch16_224", 224, 16, 12, 512, 8, 16, batch=16),
}


def mimswin_config(setup: Setup, *extra: str) -> PretrainConfig:
    """The PretrainConfig of a setup (and `extra` overrides), built through the same loader as a real run."""
    overrides = [f"model.name={setup.encoder}", f"model.img_size={setup.img_size}",
                 f"model.patch_size={setup.patch_size}", f"model.kwargs={{depth: {setup.depth}}}",
                 f"mask.ratio={setup.mask_ratio}", f"decoder.dim={setup.decoder_dim}",
                 f"decoder.depth={setup.decoder_depth}", f"decoder.heads={setup.decoder_heads}",
                 f"data.batch_size={setup.batch}", *extra]
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


def cross_builder(ratio: float) -> Callable[[Setup, torch.device], Contender]:
    """The builder of mimswin's MAE ViT with the cross decoder reconstructing `ratio` of the hidden patches."""
    def build(setup: Setup, device: torch.device) -> Contender:
        return build_mimswin(setup, device, mimswin_config(setup, "decoder.kind=cross",
                                                           f"decoder.predict_ratio={ratio}"))
    return build


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


HIERA_MASK_RATIO = 0.6
HIERA_AT_224 = {"vit_base_patch16_224": "hiera_base_224"}
DEFAULT_MASK_UNIT_ATTN = (True, True, False, False)  # timm's and HieraConfig's default


def hiera_config(setup: Setup) -> PretrainConfig:
    """The PretrainConfig of a setup's Hiera MAE, built through the same loader as a real run."""
    if setup.img_size == 224:
        presets = []
        overrides = [f"model.name={HIERA_AT_224.get(setup.encoder, 'hiera_tiny_224')}", "model.img_size=224",
                     "model.kwargs={q_pool: 2}"]
    else:
        presets, overrides = ["tiny_mae_hiera_cpu"], [f"model.img_size={setup.img_size}"]
    overrides += ["data.channels=3", "data.mean=null", "data.std=null"]  # every row reads the same 3-channel batch
    overrides += [f"mask.ratio={HIERA_MASK_RATIO}", f"decoder.dim={setup.decoder_dim}",
                  f"decoder.depth={setup.decoder_depth}", f"decoder.heads={setup.decoder_heads}",
                  f"data.batch_size={setup.batch}"]
    return load_config(PretrainConfig, presets, overrides)


def build_mimswin_mae_hiera(setup: Setup, device: torch.device) -> Contender:
    """mimswin's Hiera MAE: the encoder on the visible mask units only, the fusion decoder, norm-pix MSE."""
    return build_mimswin(setup, device, hiera_config(setup))


def build_mimswin_hiera_all_units(setup: Setup, device: torch.device) -> Contender:
    """The same model and decoder with every unit visible, its loss over all predictions: the unmasked cost."""
    run = build_mimswin(setup, device, hiera_config(setup))
    cells = run.model.grid[0] * run.model.grid[1]

    def loss_fn(images: torch.Tensor) -> torch.Tensor:
        keep = torch.arange(cells, device=images.device).expand(images.shape[0], -1)
        out = run.model(images, MaskSample(torch.zeros_like(keep, dtype=torch.bool), keep))
        return (out.pred.float() - out.target.float()).pow(2).mean()

    return Contender(run.model, loss_fn, run.optimizer, run.enable_checkpointing)


def build_hf_hiera_mae(setup: Setup, device: torch.device) -> Contender:
    """transformers' HieraForPreTraining with the timm Hiera's sizes read off the built model, the same mask ratio,
    norm-pix loss on hidden units, decoder and AdamW."""
    from transformers import HieraConfig, HieraForPreTraining

    ref = hiera_config(setup)
    m = ref.model
    hiera = create_timm_encoder(m.name, m.img_size, m.patch_size, m.drop_path_rate, m.kwargs)
    ends = hiera.stage_ends
    starts = [0, *(end + 1 for end in ends[:-1])]
    conv, dims = hiera.patch_embed.proj, [hiera.blocks[end].dim_out for end in ends]
    config = HieraConfig(
        embed_dim=dims[0], image_size=[m.img_size, m.img_size], patch_size=list(conv.kernel_size),
        patch_stride=list(conv.stride), patch_padding=list(conv.padding),
        mlp_ratio=hiera.blocks[0].mlp.fc1.out_features / dims[0], depths=[e - s + 1 for s, e in zip(starts, ends)],
        num_heads=[hiera.blocks[end].attn.heads for end in ends], embed_dim_multiplier=dims[1] / dims[0],
        num_query_pool=hiera.q_pool, query_stride=list(hiera.q_stride), masked_unit_size=list(hiera.mask_unit_size),
        masked_unit_attention=list(m.kwargs.get("mask_unit_attn", DEFAULT_MASK_UNIT_ATTN))[:len(ends)],
        layer_norm_eps=1e-6, decoder_hidden_size=setup.decoder_dim, decoder_depth=setup.decoder_depth,
        decoder_num_heads=setup.decoder_heads, normalize_pixel_loss=ref.loss.norm_pix, mask_ratio=ref.mask.ratio)
    model = HieraForPreTraining(config).to(device)
    optimizer = build_optimizer(model, ref.optim, 1e-4, **optimizer_kwargs(ref.optim, device))
    return Contender(model, lambda images: model(pixel_values=images).loss, optimizer,
                     model.gradient_checkpointing_enable)


BUILDERS: Dict[str, Callable[[Setup, torch.device], Contender]] = {
    "mimswin-mae": build_mimswin, "hf-vitmae": build_hf_vitmae, "mimswin-simmim-swin": build_mimswin_simmim_swin,
    "mimswin-mae-swin": build_mimswin_mae_swin, "hf-swin-simmim": build_hf_swin_simmim,
    "mimswin-mae-hiera": build_mimswin_mae_hiera, "hf-hiera-mae": build_hf_hiera_mae,
    "mimswin-hiera-all-units": build_mimswin_hiera_all_units,
    **{row: cross_builder(ratio) for ratio, row in zip(CROSS_PREDICT_RATIOS, CROSS_ROWS)}}
HIERA_BUILDERS = {name: BUILDERS[name] for name in HIERA_ROWS}
