"""The configuration reference page, generated from the config dataclasses so it can never drift from the schema.

`python -m mimswin.config.reference` prints it; the docs build (docs/hooks.py) adds it to the site.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import yaml

from mimswin.config.evaluation import FinetuneConfig, LinprobeConfig
from mimswin.config.pretrain import PretrainConfig

SCHEMAS: Sequence[Tuple[str, type]] = (
    ("pretrain", PretrainConfig),
    ("finetune", FinetuneConfig),
    ("linprobe", LinprobeConfig),
)


def default_of(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def show(value: Any) -> str:
    """A default as the user writes it in YAML or an override (`null`, `[0.9, 0.95]`, `{}`)."""
    if dataclasses.is_dataclass(value):
        return "(section)"
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return text[:-4].strip() if text.endswith("\n...") else text


def type_name(field: dataclasses.Field) -> str:
    return field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))


def first_line(doc: Optional[str]) -> str:
    return (doc or "").strip().splitlines()[0] if (doc or "").strip() else ""


def rows(schema: type, prefix: str = "") -> Iterator[Tuple[str, str, str]]:
    """(key, type, default) for every leaf key of a schema, sections flattened to dotted keys."""
    for field in dataclasses.fields(schema):
        default = default_of(field)
        if dataclasses.is_dataclass(default):
            yield from rows(type(default), f"{prefix}{field.name}.")
        else:
            yield f"{prefix}{field.name}", type_name(field), show(default)


def sections(schema: type) -> Iterator[Tuple[str, str, List[Tuple[str, str, str]]]]:
    """(section name, its docstring's first line, its rows); top-level scalars form the first section."""
    top = [(f.name, type_name(f), show(default_of(f))) for f in dataclasses.fields(schema)
           if not dataclasses.is_dataclass(default_of(f))]
    if top:
        yield "top level", "", top
    for field in dataclasses.fields(schema):
        default = default_of(field)
        if dataclasses.is_dataclass(default):
            doc = first_line(type(default).__doc__)
            generated = doc.startswith(type(default).__name__ + "(")  # dataclass's own signature, not a docstring
            yield field.name, "" if generated else doc, list(rows(type(default), f"{field.name}."))


def reference_markdown() -> str:
    """Every key of every program's config: type and default, grouped by section."""
    lines = ["# Configuration reference", "",
             "Generated from the config schemas (`mimswin/config/`) at every docs build. How to set "
             "keys (presets, `key=value` overrides) is explained in [Configuration](configuration.md).", ""]
    for program, schema in SCHEMAS:
        target = f"{schema.__module__}:{schema.__name__}"
        lines += [f"## {program}", "", f"`mimswin {program}` — schema `{target}`.", ""]
        for name, doc, table in sections(schema):
            lines += [f"### {name}", ""] + ([doc, ""] if doc else [])
            lines += ["| key | type | default |", "| --- | --- | --- |"]
            lines += [f"| `{key}` | `{kind}` | `{default}` |" for key, kind, default in table]
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(reference_markdown())
