"""Loading a config: schema defaults <- YAML preset(s) <- overrides (`key.sub=value`), then the schema's own checks.

OmegaConf checks every key and type against the schema; its errors become one line that names the offending key.
Presets ship inside the package (`mimswin.presets`, the repository's configs/ folder) and are found by name.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Dict, List, Sequence, Type, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from mimswin.errors import ConfigError

C = TypeVar("C")


def preset_root() -> Path:
    """Where the presets are: the source checkout's configs/ when running from one, else the installed package's
    copy (`mimswin.presets`, which the wheel maps from configs/)."""
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "configs").is_dir() and (checkout / "pyproject.toml").is_file():
        return checkout / "configs"
    try:
        import mimswin.presets as presets
    except ImportError:
        return checkout / "configs"
    return Path(next(iter(presets.__path__)))


PRESET_DIR = preset_root()


def resolve_preset(name_or_path: str) -> Path:
    """A preset is a YAML path, or a bare name looked up under configs/ (e.g. `tiny_mae_vit_cpu`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    matches = sorted(PRESET_DIR.rglob(f"{path.stem}.yaml")) if PRESET_DIR.is_dir() else []
    if len(matches) == 1:
        return matches[0]
    raise ConfigError(f"config file '{name_or_path}' not found (nor a preset of that name under {PRESET_DIR})")


def list_presets() -> List[str]:
    """Names of the YAML presets shipped with mimswin (configs/ in the repository)."""
    return sorted(p.relative_to(PRESET_DIR).with_suffix("").as_posix() for p in PRESET_DIR.rglob("*.yaml"))


def _read_yaml(path: Path) -> Dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}: invalid YAML{where}: {getattr(err, 'problem', err)}") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read config file: {err.strerror}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of keys, got {type(data).__name__}")
    return data


# keys that were renamed: configs and run dirs written with the old name keep loading
RENAMED_KEYS = {"train.grad_checkpointing": "train.activation_checkpointing"}


def renamed(data: Dict[str, Any]) -> Dict[str, Any]:
    """A config mapping with every old key of `RENAMED_KEYS` moved to its new name."""
    for old, new in RENAMED_KEYS.items():
        (section, old_key), new_key = old.split("."), new.split(".")[1]
        values = data.get(section)
        if isinstance(values, dict) and old_key in values:
            data[section] = {new_key if k == old_key else k: v for k, v in values.items()}
    return data


def _explain(err: OmegaConfBaseException, origin: str) -> ConfigError:
    key = getattr(err, "full_key", None) or "?"
    if isinstance(err, ConfigKeyError):
        return ConfigError(f"{origin}: unknown config key '{key}'")
    message = str(err).splitlines()[0]
    if isinstance(err, ValidationError):
        return ConfigError(f"{origin}: config key '{key}' has the wrong type: {message}")
    return ConfigError(f"{origin}: config key '{key}': {message}")


def parse_overrides(overrides: Sequence[str]) -> List[str]:
    """Normalise `key=value`, `--key=value` and `--key value` tokens into `key=value` strings."""
    result, tokens = [], list(overrides)
    while tokens:
        token = tokens.pop(0)
        bare = token[2:] if token.startswith("--") else token
        if "=" in bare:
            result.append(log_with_alias(bare))
        elif token.startswith("--") and tokens and not tokens[0].startswith("--"):
            result.append(log_with_alias(f"{bare}={tokens.pop(0)}"))
        else:
            raise ConfigError(f"override '{token}' is not of the form key=value (e.g. optim.blr=1e-4)")
    return result


def log_with_alias(item: str) -> str:
    """`log_with=wandb,tensorboard` / `log_with=none` (as in accelerate's `--log_with`) -> `train.log_with=[...]`."""
    key, _, value = item.partition("=")
    if key != "log_with":
        return item
    names = [] if value.strip().lower() in ("none", "") else [n.strip() for n in value.strip("[]").split(",")]
    return f"train.log_with=[{', '.join(names)}]"


def load_config(
    schema: Type[C], presets: Sequence[str | Path] = (), overrides: Sequence[str] = ()
) -> C:
    """Build a config object of type `schema` from presets and `key=value` overrides, checked by its `validate()`."""
    merged = OmegaConf.structured(schema)
    for preset in presets:
        path = resolve_preset(str(preset))
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(renamed(_read_yaml(path))))
        except OmegaConfBaseException as err:
            raise _explain(err, str(path)) from None
    for item in parse_overrides(overrides):
        key, _, raw = item.partition("=")
        key = RENAMED_KEYS.get(key, key)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            value = raw.strip()  # YAML 1.1 reads no/yes/on/off as booleans: `train.mixed_precision=no` means "no"
        try:
            merged = OmegaConf.merge(merged, _nested(key, value))
        except OmegaConfBaseException as err:
            raise _explain(err, f"override '{item}'") from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        raise _explain(err, "config") from None
    cfg.validate()
    return cfg


def _nested(key: str, value: Any) -> Any:
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    return OmegaConf.create(node)


def to_dict(cfg: Any) -> Dict[str, Any]:
    """Plain nested dict of a config object, for YAML dumps and trackers."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML, so a run dir says exactly what produced it."""
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def flat_config(cfg: Any) -> Dict[str, Any]:
    """Config as flat `a.b` keys with scalar values, the form every tracker accepts."""
    flat: Dict[str, Any] = {}

    def walk(prefix: str, node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", to_dict(cfg))
    return flat


