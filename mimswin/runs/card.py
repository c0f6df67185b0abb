"""The model card of a pretraining run's encoder in the Hub's format (timm's own `generate_readme`: YAML front matter
with `library_name: timm`, tags and a license for the user to set), and the line the pretraining program ends with.

A card says what was pretrained (method, encoder, data, image count, channels, size, statistics), how (the command and
the config), the loss reached, and the evaluations written inside the run dir (`train.output_dir=RUN/probe`), each
next to its random-init baseline where one is there too.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from mimswin.config.loading import to_dict
from mimswin.config.pretrain import PretrainConfig
from mimswin.config.sections import DataConfig, size_pair
from mimswin.models.create import encoder_kwargs
from mimswin.runs.layout import CHECKPOINTS, CONFIG, METRICS, RESULTS, RunDir, read_metrics

TASK = "image-feature-extraction"
LICENSE = "other"  # the Hub's word for "not a listed license": the user sets theirs (weights and data)


@dataclass
class RunFacts:
    """What a card tells beyond the config: the run dir, the step reached, the images of the source (None:
    unknown), the command that started the run."""

    cfg: PretrainConfig
    root: Path
    step: int
    images: Optional[int] = None
    command: Optional[str] = None


def data_name(data: DataConfig) -> str:
    """The source of a data section, in words."""
    if data.hf is not None:
        return f"the Hugging Face dataset `{data.hf}` (split {data.hf_split})"
    if data.shards is not None:
        return f"the webdataset shards `{data.shards}`"
    if data.path is not None:
        return f"the images of `{data.path}`"
    return "the embedded MNIST-5k digits"


def run_metrics(root: Path) -> List[Dict[str, Any]]:
    """The records of the run's metrics.jsonl ([] before the first)."""
    return read_metrics(root / METRICS) if (root / METRICS).is_file() else []


def loss_span(records: List[Dict[str, Any]]) -> Optional[Tuple[Dict[str, Any], Dict[str, Any], float]]:
    """(first and last record with a loss, median images/s of the logged intervals); None before any loss."""
    losses = [r for r in records if r.get("loss") is not None]
    if not losses:
        return None
    return losses[0], losses[-1], statistics.median(r.get("images_per_s", 0.0) for r in losses)


def labels_used(folder: Path) -> str:
    """The labels an evaluation trained on, from its config.yaml: all, a fraction or a count per class."""
    try:
        data = (yaml.safe_load((folder / CONFIG).read_text()) or {}).get("data", {})
    except (OSError, yaml.YAMLError, AttributeError):
        return "?"
    if data.get("label_fraction") is not None:
        return f"{100 * data['label_fraction']:g} %"
    if data.get("labels_per_class") is not None:
        return f"{data['labels_per_class']} per class"
    return "all"


def evaluations(root: Path) -> Dict[Tuple[str, str], Dict[bool, Dict[str, Any]]]:
    """The results.json of evaluations inside the run dir: (evaluation, labels) -> {random_init: result}."""
    found: Dict[Tuple[str, str], Dict[bool, Dict[str, Any]]] = {}
    for path in sorted(root.rglob(RESULTS)):
        if CHECKPOINTS in path.relative_to(root).parts:
            continue
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(result, dict) or "program" not in result:
            continue
        name = result["program"] + (f" ({result['mode']})" if result.get("mode") else "")
        found.setdefault((name, labels_used(path.parent)), {})[bool(result.get("random_init"))] = {
            **result, "folder": path.parent.relative_to(root).as_posix()}
    return found


def top1(result: Optional[Dict[str, Any]]) -> str:
    """'top-1 (k-NN top-1)' of an evaluation's results, or a dash."""
    if result is None:
        return "—"
    value = (result.get("last") or {}).get("val_top1", (result.get("best") or {}).get("top1"))
    knn = result.get("knn_top1")
    text = f"{value:.2f}" if isinstance(value, (int, float)) else "?"
    return text + (f" (k-NN {knn:.2f})" if isinstance(knn, (int, float)) else "")


def evaluation_table(root: Path, records: List[Dict[str, Any]]) -> Optional[str]:
    """A markdown table of the run's evaluations beside their random-init baselines; None when there are none."""
    rows = []
    for (name, labels), pair in evaluations(root).items():
        folder = (pair.get(False) or pair[True])["folder"]
        rows.append(f"| {name} | {labels} | {top1(pair.get(False))} | {top1(pair.get(True))} | `{folder}` |")
    online = [r["online_probe_top1"] for r in records if r.get("online_probe_top1") is not None]
    if online:
        rows.append(f"| online probe, during pretraining | all | {online[-1]:.2f} | — | `{METRICS}` |")
    if not rows:
        return None
    return "\n".join(["Val top-1 % (the run dir's evaluations; random init: the same network untrained).", "",
                      "| evaluation | labels | pretrained | random init | folder |", "|---|---|---:|---:|---|",
                      *rows])


def usage(load_name: str) -> str:
    """The Python lines that load the encoder and build its transform with timm alone."""
    return ("```python\nimport timm\n\n"
            f"model = timm.create_model(\"{load_name}\", pretrained=True, num_classes=0)  # num_classes=N: a new head\n"
            "config = timm.data.resolve_model_data_config(model)  # the run's channels, size, mean and std\n"
            "transform = timm.data.create_transform(**config)\n```\n")


def model_card(facts: RunFacts, load_name: str) -> Dict[str, Any]:
    """The card as timm's `generate_readme` / `push_to_hf_hub` take it (`model_card=`); `load_name` is what
    `timm.create_model` is given in the usage lines (`local-dir:FOLDER` or `hf-hub:REPO`)."""
    cfg, root = facts.cfg, facts.root
    data, (height, width) = cfg.data, size_pair(cfg.model.img_size)
    records = run_metrics(root)
    span = loss_span(records)
    method = cfg.method.upper()
    images = f"{facts.images} images" if facts.images is not None else "images"
    description = (f"A `{cfg.model.name}` encoder pretrained with {method} by mimswin on "
                   f"{data_name(data)}: {images} of {data.channels} channel(s) at {height} x {width} px. It is a "
                   "plain timm model: its `pretrained_cfg` carries the input size, mean and std, so "
                   "`timm.data.resolve_model_data_config` builds a transform with the channels, size and statistics "
                   "it was trained on.\n\n"
                   f"License: `{LICENSE}` until you set yours in the front matter (it must allow what your data's "
                   "terms allow).")
    if facts.command:
        description += f"\n\nMade with:\n\n```console\n$ {facts.command}\n```"
    description += ("\n\n<details><summary>config.yaml</summary>\n\n```yaml\n"
                    f"{yaml.safe_dump(to_dict(cfg), sort_keys=False)}```\n\n</details>")
    details: Dict[str, Any] = {
        "Model Type": "Image feature backbone (no classifier head)",
        "Method": f"{method}, mask ratio {cfg.mask.ratio}",
        "Encoder": f"{cfg.model.name} ({', '.join(f'{k}={v}' for k, v in encoder_kwargs(cfg).items())})",
        "Data": data_name(data),
        "Images": facts.images if facts.images is not None else "unknown (a stream)",
        "Channels": data.channels,
        "Image size": f"{height} x {width}",
        "Mean": ", ".join(f"{value:.6g}" for value in data.mean),
        "Std": ", ".join(f"{value:.6g}" for value in data.std),
        "Steps": facts.step,
    }
    if span is not None:
        first, last, speed = span
        details["Loss"] = (f"{last['loss']:.4f} at step {last['step']} (first logged: {first['loss']:.4f} at step "
                           f"{first['step']}; {speed:.0f} images/s)")
    card = {"tags": [TASK, "timm", "mimswin", "masked-image-modeling", cfg.method], "library_name": "timm",
            "license": LICENSE, "description": description, "details": details, "usage": usage(load_name)}
    table = evaluation_table(root, records)
    if table is not None:
        card["comparison"] = table
    return card


def card_text(card: Dict[str, Any], name: str) -> str:
    """The README.md of the card, as timm writes one when it pushes a model."""
    from timm.models._hub import generate_readme

    return generate_readme(card, name, task_name=TASK)


def run_summary(run_dir: RunDir) -> str:
    """The line a pretraining run ends with: its loss at both ends, images/s, where the encoder and picture are."""
    span = loss_span(run_metrics(run_dir.root))
    losses = ""
    if span is not None:
        first, last, speed = span
        start = f"{first['loss']:.3f} at step {first['step']} -> " if first is not last else ""
        losses = f"loss {start}{last['loss']:.3f} at step {last['step']}, {speed:.0f} images/s; "
    encoder = run_dir.encoder_dir
    return (f"done: {run_dir.root}: {losses}encoder: {encoder} (timm.create_model('local-dir:{encoder}', "
            f"pretrained=True)), picture: {run_dir.picture}")
