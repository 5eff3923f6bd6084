"""YAML + ``dotted.key=value`` overrides -> validated :class:`Config`.

Errors are :class:`ConfigError` with one line that names the key, the problem
and the fix (closest valid key for a typo, expected type for a wrong value).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megalm.config.errors import ConfigError
from megalm.config.schema import Config


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _literal(value: Any, tp: Any, key: str) -> Any:
    for allowed in typing.get_args(tp):
        if value == allowed and type(value) is type(allowed):
            return value
    raise _wrong(value, tp, key)


def _union(value: Any, tp: Any, key: str) -> Any:
    for arg in typing.get_args(tp):
        try:
            return _coerce(value, arg, key)
        except ConfigError:
            continue
    raise _wrong(value, tp, key)


def _scalar(value: Any, tp: Any, key: str) -> Any:
    if tp is type(None) and value is None:
        return None
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # PyYAML reads '1e-3' (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if tp is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if tp in (bool, str) and isinstance(value, tp):
        return value
    if tp not in (type(None), float, int, bool, str):  # pragma: no cover - schema uses only these
        raise TypeError(f"unsupported annotation {tp!r} for {key}")
    raise _wrong(value, tp, key)


def _wrong(value: Any, tp: Any, key: str) -> ConfigError:
    return ConfigError(f"config key '{key}' expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; only int/str -> float is coerced."""
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return _literal(value, tp, key)
    if origin in (typing.Union, types.UnionType):
        return _union(value, tp, key)
    return _scalar(value, tp, key)


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            valid = [f"{prefix}{n}" for n in names]
            raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted, valid)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{dotted}' is a section; expected a mapping")
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    return cls(**kwargs)


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    keys = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += _all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Set ``a.b=value`` in a nested dict; the value is parsed as YAML (``3``, ``true``, ``1e-3``)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if dotted.strip() not in _all_keys():
        raise ConfigError(f"unknown config key '{dotted}'{_suggest(dotted, _all_keys())}")
    value = yaml.safe_load(raw) if raw.strip() else ""
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply overrides, validate and return a :class:`Config`.

    Args:
        path: YAML file; ``None`` means all defaults.
        overrides: ``section.key=value`` strings applied after the file.

    Raises:
        ConfigError: unknown key (with the closest valid key), wrong type (with the
            expected type), unreadable file.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(
                f"config file '{p}' does not exist; pass an existing YAML, e.g. configs/tiny.yaml"
            )
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}".replace("\n", " ")) from e
        if not isinstance(tree, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections, got {type(tree).__name__}")
    for item in overrides:
        apply_override(tree, item)
    return _build(Config, tree, "")


def config_from_dict(tree: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """A saved config (:func:`to_dict`, e.g. a checkpoint's) plus overrides, validated as
    :func:`load_config` validates a file."""
    tree = copy.deepcopy(tree)
    for item in overrides:
        apply_override(tree, item)
    return _build(Config, tree, "")


def to_dict(cfg: Config) -> dict[str, Any]:
    """The config as plain nested dicts (for YAML/JSON output)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again by :func:`load_config`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
