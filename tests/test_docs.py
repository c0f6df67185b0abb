"""The docs site builds with warnings as errors, its generated pages follow the code, and every command of the quick
start runs (with a shorter pretraining)."""

import contextlib
import dataclasses
import importlib.util
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_OVERRIDES
from PIL import Image

from mimswin.cli import main
from mimswin.config import PretrainConfig
from mimswin.config.reference import SCHEMAS, reference_markdown, rows

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"


def load_hooks():
    spec = importlib.util.spec_from_file_location("docs_hooks", DOCS / "hooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_build_strict_with_generated_reference_recipes_and_mask_pictures(tmp_path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "WARNING" not in result.stderr
    reference = (site / "config-reference" / "index.html").read_text()
    for key, _, _ in rows(PretrainConfig):
        assert f"<code>{key}</code>" in reference, key
    recipes = (site / "recipes" / "index.html").read_text()
    assert "<code>tiny_mae_vit_cpu</code>" in recipes and "<code>vit_base_patch16_224</code>" in recipes
    for name in ("mae", "simmim", "uniform"):
        with Image.open(site / "img" / f"mask_{name}.png") as picture:
            assert picture.size == (192, 192)


def test_config_reference_lists_every_leaf_key_with_its_default():
    def leaves(schema):
        return [f for section in dataclasses.fields(schema) for f in
                (dataclasses.fields(section.default_factory()) if section.default_factory is not dataclasses.MISSING
                 and dataclasses.is_dataclass(section.default_factory()) else [section])]
    schemas = [schema for _, schema in SCHEMAS]
    text = reference_markdown()
    assert PretrainConfig in schemas
    assert len(re.findall(r"^\| `[a-z_.]+` \|", text, re.M)) == sum(len(leaves(s)) for s in schemas)
    assert "| `optim.betas` | `List[float]` | `[0.9, 0.95]` |" in text
    assert "| `model.patch_size` | `Optional[int]` | `null` |" in text


def test_nav_leaves_out_planned_pages_not_written_yet_but_keeps_other_missing_pages(tmp_path):
    hooks = load_hooks()
    (tmp_path / "index.md").write_text("# x")
    (tmp_path / "data.md").write_text("# x")
    nav = [{"Home": "index.md"}, {"Swin": "swin.md"}, {"Data": "data.md"}, {"Typo": "scalling.md"},
           {"More": [{"Quality": "quality.md"}]}]
    assert hooks.drop_absent(nav, tmp_path) == [{"Home": "index.md"}, {"Data": "data.md"}, {"Typo": "scalling.md"}]


def quick_start_blocks():
    section = (DOCS / "index.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, re.S)


def test_every_quick_start_command_runs(tmp_path, monkeypatch, capsys):
    blocks = quick_start_blocks()
    assert [language for language, _ in blocks] == ["bash", "python"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "docs").symlink_to(DOCS)
    for line in blocks[0][1].strip().splitlines():
        if line.startswith("pip install"):
            continue  # the test environment is that install
        command = shlex.split(line)
        assert command[0] == "mimswin", line
        if command[1] == "pretrain":
            command += [*TINY_OVERRIDES, "train.max_steps=2"]
        assert main(command[1:]) == 0, (line, capsys.readouterr().err)
    code = blocks[1][1]
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(compile(code, "quick start", "exec"), {})
    expected = [comment.strip() for comment in re.findall(r"^print\(.*\)\s*#(.*)$", code, re.M)]
    assert output.getvalue().splitlines() == expected
    assert (tmp_path / "runs" / "quickstart" / "pictures" / "reconstruction_000.png").is_file()
