"""A normal (non-editable) install finds every preset from any directory and runs one."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, TINY_OVERRIDES

CHECK_PRESETS = """
import json, sys
from mimswin.config import FinetuneConfig, LinprobeConfig, PretrainConfig, list_presets, load_config
import mimswin
schemas = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "linprobe": LinprobeConfig}
names = list_presets()
for name in names:
    load_config(schemas[name.split("/")[0]], [name.split("/")[1]])
print(json.dumps({"package": mimswin.__file__, "presets": names}))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The project built as a wheel and installed into a scratch folder (dependencies, and the setuptools the test
    extra pins, from this environment)."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    return target


def run_installed(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_an_installed_wheel_loads_every_preset_by_name_from_another_directory(installed, tmp_path):
    result = run_installed(installed, tmp_path, "-c", CHECK_PRESETS)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert Path(found["package"]).is_relative_to(installed)
    configs = REPO / "configs"
    shipped = sorted(p.relative_to(configs).with_suffix("").as_posix() for p in configs.rglob("*.yaml"))
    assert found["presets"] == shipped


def test_an_installed_wheel_pretrains_a_preset_from_another_directory(installed, tmp_path):
    result = run_installed(installed, tmp_path, "-m", "mimswin.cli", "pretrain", "--config", "tiny_mae_vit_cpu",
                           *TINY_OVERRIDES, "train.max_steps=2", "train.output_dir=run")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "run" / "encoder.safetensors").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file()
