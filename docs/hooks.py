"""mkdocs hooks: pages and pictures made from the code at build time, and a nav that tolerates pages not yet written.

Generated: `config-reference.md` (from the config schemas), `recipes.md`'s preset table, `img/mask_*.png` (masks drawn
on an embedded MNIST digit). Not part of the site itself (excluded in mkdocs.yml).
"""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# Pages other work will add; the nav lists them and they appear as soon as their file exists.
PLANNED_PAGES = {"swin.md", "data.md", "evaluation.md", "reliability.md", "quality.md", "performance.md"}
PRESET_TABLE_MARK = "<!-- presets table -->"
log = logging.getLogger("mkdocs.hooks.mimswin")


def drop_absent(nav: list, docs_dir: Path) -> list:
    """The nav without entries for planned pages whose file does not exist yet (other missing pages stay: errors)."""
    kept = []
    for entry in nav:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        if isinstance(value, list):
            value = drop_absent(value, docs_dir)
            if value:
                kept.append({next(iter(entry)): value})
        elif isinstance(value, str) and value in PLANNED_PAGES and not (docs_dir / value).is_file():
            log.info("nav: %s not written yet, left out", value)
        else:
            kept.append(entry)
    return kept


def on_config(config, **kwargs):
    config["nav"] = drop_absent(config["nav"], Path(config["docs_dir"]))
    return config


def mask_pictures() -> dict:
    """PNG bytes of the three masking schemes on one 192-px digit (16-px patches, 12x12 grid), hidden in gray."""
    import numpy as np
    import torch
    from PIL import Image

    from mimswin.data.sources import EmbeddedMNIST
    from mimswin.models.masking import random_mask

    digit = Image.fromarray(EmbeddedMNIST("val").images[0].numpy()).convert("RGB").resize((192, 192), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(digit).copy()).float() / 255  # [192, 192, 3]
    generator = torch.Generator().manual_seed(0)
    mae = random_mask(1, 144, 0.75, generator=generator).hidden.view(12, 12)
    units = random_mask(1, 36, 0.6, generator=generator).hidden.view(6, 6)
    simmim = units.repeat_interleave(2, 0).repeat_interleave(2, 1)
    one_per_block = random_mask(36, 4, 0.75, generator=generator).hidden.view(6, 6, 2, 2)
    uniform = one_per_block.permute(0, 2, 1, 3).reshape(12, 12)
    pictures = {}
    for name, hidden in (("mae", mae), ("simmim", simmim), ("uniform", uniform)):
        cover = hidden.repeat_interleave(16, 0).repeat_interleave(16, 1)[..., None].float()
        shown = pixels * (1 - cover) + 0.5 * cover
        grid = torch.zeros(192, 192, 1)
        grid[::16], grid[:, ::16] = 1, 1
        image = (torch.where(grid.bool(), 0.8 * shown + 0.2, shown) * 255).round().byte().numpy()
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        pictures[f"img/mask_{name}.png"] = buffer.getvalue()
    return pictures


def preset_table() -> str:
    """One row per shipped pretraining preset: method, timm model, size, epochs, batch, lr settings, mask ratio."""
    import yaml

    from mimswin.config import PRESET_DIR, list_presets

    lines = ["| preset | method | model | img | epochs | batch / process | blr | warmup epochs | mask ratio |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in list_presets():
        if not name.startswith("pretrain/"):
            continue
        raw = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text()) or {}

        def get(section: str, key: str) -> object:
            return raw.get(section, {}).get(key, "") if isinstance(raw.get(section), dict) else ""

        lines.append(f"| `{name.split('/')[-1]}` | {raw.get('method', '')} | `{get('model', 'name')}` | "
                     f"{get('model', 'img_size')} | {get('train', 'epochs')} | {get('data', 'batch_size')} | "
                     f"{get('optim', 'blr')} | {get('optim', 'warmup_epochs')} | {get('mask', 'ratio')} |")
    return "\n".join(lines)


def on_files(files, config, **kwargs):
    from mkdocs.structure.files import File

    from mimswin.config.reference import reference_markdown

    files.append(File.generated(config, "config-reference.md", content=reference_markdown()))
    for path, data in mask_pictures().items():
        files.append(File.generated(config, path, content=data))
    return files


def on_page_markdown(markdown, page, **kwargs):
    if PRESET_TABLE_MARK in markdown:
        markdown = markdown.replace(PRESET_TABLE_MARK, preset_table())
    return markdown
