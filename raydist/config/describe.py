"""`raydist config <stage>`: a stage's full default config as YAML, every field preceded by its help text."""

from __future__ import annotations

import textwrap
import typing
from typing import Any, Optional

import yaml
from pydantic import BaseModel, TypeAdapter

REQUIRED = "null  # REQUIRED"


def _model_class(annotation: Any) -> Optional[type[BaseModel]]:
    """The BaseModel class of a field typed ``M`` or ``Optional[M]``, else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
        return args[0]
    return None


def _scalar(value: Any) -> str:
    """One value as inline YAML (flow style for lists and mappings)."""
    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return text.removesuffix("...").strip()  # a lone scalar ends with YAML's document-end marker


def _lines(cls: type[BaseModel], values: Optional[dict[str, Any]], indent: int) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    for name, field in cls.model_fields.items():
        if field.description:
            out += [pad + "# " + line for line in textwrap.wrap(field.description, 116 - indent)]
        sub = _model_class(field.annotation)
        if values is not None and name in values:
            value, known = values[name], True
        elif not field.is_required():
            value, known = field.get_default(call_default_factory=True), True
        else:
            value, known = None, False
        if isinstance(value, BaseModel):
            value = value.model_dump(mode="json")
        if sub is not None and (isinstance(value, dict) or not known):
            out.append(f"{pad}{name}:" + ("" if known else "  # REQUIRED (its fields below)"))
            out += _lines(sub, value if known else None, indent + 2)
        elif known:
            out.append(f"{pad}{name}: {_scalar(_jsonable(value))}")
        else:
            out.append(f"{pad}{name}: {REQUIRED}")
    return out


def _jsonable(value: Any) -> Any:
    return TypeAdapter(type(value)).dump_python(value, mode="json") if value is not None else None


def describe(stage: str) -> str:
    """The default config of ``stage`` as commented YAML: fields without a default read ``null  # REQUIRED``."""
    from raydist.config import stage_config_class

    cls = stage_config_class(stage)
    head = [
        f"# raydist {stage} config: every field with its default. Fill in the REQUIRED ones, delete what you",
        f"# keep at its default, then: raydist {stage} -c FILE",
    ]
    return "\n".join(head + _lines(cls, None, 0)) + "\n"
