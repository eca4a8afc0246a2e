"""YAML is only the serialised form of the pydantic configs; this module reads it and applies overrides."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field or file at fault."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into its key path and a YAML-parsed value (``1e-4`` → float, ``[a,b]`` → list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key")
    if raw.strip().startswith("@"):  # a pipeline reference ("@sweep"): YAML reserves '@', take it as a string
        return parts, raw.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with dotted overrides applied (intermediate mappings are created)."""
    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for p in parts[:-1]:
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {p!r} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return out


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown field (typo?)"
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def config_from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>") -> T:
    """Validate ``data`` as ``cls``; raise :class:`ConfigError` listing every bad field by dotted name."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None, overrides: Iterable[str] = ()) -> T:
    """Load a YAML config as ``cls`` with dotted ``overrides`` (``optim.lr=1e-4``) applied on top.

    Raises:
        ConfigError: the file is missing or not YAML, an override is malformed, or a field is unknown or invalid.
    """
    data = read_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return config_from_dict(cls, data, str(path) if path else "command line")


def dump_config(cfg: BaseModel) -> str:
    """The resolved config as YAML (what a run directory records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
