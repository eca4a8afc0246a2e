"""Config of `raydist pipeline`: finetune → distill → sweep → serve, each stage optional, chained by references.

A pipeline spec holds one full stage config per stage it runs. ``stage`` and ``run`` may be left out of each
section: ``run.name`` defaults to the section's key and ``run.output_dir`` to ``<output_dir>/<name>``, so every
stage of the pipeline lives in ``<output_dir>/<name>/<stage>/`` beside the pipeline's ``lineage.json``.

Where a model path or an artifact goes, ``@finetune``, ``@distill`` or ``@sweep`` means "the artifact that
stage of this pipeline produced" (resolved when the stage starts). Defaults: ``distill.teacher.path`` is
``@finetune`` when there is a finetune stage; ``sweep.model.path`` and ``serve.artifact`` are the previous
stage's artifact. A spec whose stages do not connect is refused here, at load time, naming the field.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Literal, Optional

from pydantic import Field, model_validator

from raydist.config.base import StageConfig
from raydist.config.distill import DistillConfig
from raydist.config.finetune import FinetuneConfig
from raydist.config.serve import ServeConfig
from raydist.config.sweep import SweepConfig

STAGE_ORDER = ("finetune", "distill", "sweep", "serve")
PRODUCERS = ("finetune", "distill", "sweep")  # stages whose artifact a later stage can use (serve makes none)

# Where a reference may stand: (stage, dotted field) -> what the field is, for messages.
REFERENCE_FIELDS = {
    ("finetune", "model.path"): "the model to fine-tune",
    ("distill", "teacher.path"): "the teacher",
    ("distill", "student.path"): "the pretrained student",
    ("sweep", "model.path"): "the model to compress",
    ("serve", "artifact"): "the artifact to serve",
}


def is_reference(value: Any) -> bool:
    """True for ``@finetune`` / ``@distill`` / ``@sweep`` (and any other ``@word``, refused by validation)."""
    return isinstance(value, str) and value.startswith("@") and len(value) > 1 and "/" not in value


def join_location(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or a URI; a URI keeps its query (``s3://b/p?endpoint_override=...``)."""
    from raydist.core import storage

    return str(storage.join(base, *parts))


def _get(data: dict, dotted: str) -> Any:
    node: Any = data
    for key in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _previous_producer(present: list[str], stage: str) -> Optional[str]:
    earlier = [s for s in PRODUCERS if s in present and STAGE_ORDER.index(s) < STAGE_ORDER.index(stage)]
    return earlier[-1] if earlier else None


class PipelineConfig(StageConfig):
    """Everything `raydist pipeline` needs: where the pipeline lives and one config per stage it runs.

    ``job`` (from :class:`StageConfig`) is the pipeline's: `raydist submit` reads it, and its ``env`` reaches
    every stage's workers (each stage gets a copy; a section of its own is refused).
    """

    stage: Literal["pipeline"] = Field("pipeline", description="Which command this spec drives.")
    name: str = Field(..., pattern=r"^[A-Za-z0-9._-]+$", description="The pipeline's directory under output_dir.")
    output_dir: str = Field("runs", description="Parent of the pipeline directory: a local path or a URI.")
    finetune: Optional[FinetuneConfig] = Field(None, description="A fine-tuning config (`stage`, `run` optional).")
    distill: Optional[DistillConfig] = Field(
        None, description="A distillation config; teacher.path defaults to '@finetune' when there is a finetune stage."
    )
    sweep: Optional[SweepConfig] = Field(
        None, description="A compression sweep config; model.path defaults to the previous stage's artifact."
    )
    serve: Optional[ServeConfig] = Field(
        None, description="A serve config; artifact defaults to the previous stage's artifact, model_name to `name`."
    )

    @model_validator(mode="before")
    @classmethod
    def _fill_stage_defaults(cls, data: Any) -> Any:
        """Give each section its stage defaults and default references before the stage configs validate."""
        if not isinstance(data, dict):
            return data
        data = copy.deepcopy(data)
        present = [s for s in STAGE_ORDER if data.get(s) is not None]
        name, output_dir = data.get("name"), data.get("output_dir", "runs")
        for stage in present:
            section = data[stage]
            if not isinstance(section, dict):
                continue  # the stage config reports the wrong type
            section.setdefault("stage", stage)
            if "job" in section:
                raise ValueError(
                    f"{stage}.job: a stage inside a pipeline has no job section of its own; "
                    f"put it at the top level (`job:`), where `raydist submit` reads it"
                )
            if data.get("job") is not None:
                section["job"] = data["job"]  # its env reaches the stage's workers
            if stage != "serve":
                run = section.get("run")
                if run is None:
                    run = section["run"] = {}
                if isinstance(run, dict):
                    run.setdefault("name", stage)
                    if isinstance(name, str) and isinstance(output_dir, str):
                        run.setdefault("output_dir", join_location(output_dir, name))
            previous = _previous_producer(present, stage)
            if stage == "distill":
                teacher = section.get("teacher")
                if teacher is None:
                    teacher = section["teacher"] = {}
                if isinstance(teacher, dict) and teacher.get("path") is None:
                    if "finetune" not in present:
                        raise ValueError(
                            "distill.teacher.path: no stage of this pipeline produces a teacher (it has no finetune "
                            "stage); give teacher.path (a model directory, .gguf file or hub id) or add a "
                            "finetune section"
                        )
                    teacher["path"] = "@finetune"
            elif stage == "sweep":
                if section.get("target", "compress") != "compress":
                    raise ValueError(
                        f"sweep.target: the pipeline's sweep is a compression sweep (target: compress), got "
                        f"{section.get('target')!r}; run a fine-tuning sweep on its own with `raydist sweep`"
                    )
                model = section.get("model")
                if model is None:
                    model = section["model"] = {}
                if isinstance(model, dict) and model.get("path") is None:
                    if previous is None:
                        raise ValueError(
                            "sweep.model.path: nothing to compress (no finetune or distill stage "
                            "before the sweep); give model.path or add a stage before it"
                        )
                    model["path"] = f"@{previous}"
            elif stage == "serve":
                if section.get("artifact") is None:
                    if previous is None:
                        raise ValueError(
                            "serve.artifact: nothing to serve (no finetune, distill or sweep stage "
                            "before it); give serve.artifact or add a stage before it"
                        )
                    section["artifact"] = f"@{previous}"
                if section.get("model_name") is None and isinstance(name, str):
                    section["model_name"] = name
        return data

    @model_validator(mode="after")
    def _stages_connect(self) -> "PipelineConfig":
        present = self.stages()
        if not present:  # checked after the fields, so a misspelt section is reported as an unknown field
            raise ValueError("a pipeline needs at least one of the sections " + ", ".join(STAGE_ORDER))
        for stage in present:
            dumped = getattr(self, stage).model_dump(mode="json")
            for path, value in _strings(dumped):
                allowed = (stage, path) in REFERENCE_FIELDS
                if not allowed:
                    if is_reference(value) and value[1:] in STAGE_ORDER:
                        raise ValueError(
                            f"{stage}.{path}: a stage reference ({value!r}) may only stand where a model path or "
                            f"artifact goes: " + ", ".join(f"{s}.{f}" for s, f in REFERENCE_FIELDS)
                        )
                    continue
                what = REFERENCE_FIELDS[(stage, path)]
                if is_reference(value):
                    target = value[1:]
                    if target not in PRODUCERS:
                        raise ValueError(
                            f"{stage}.{path}: unknown reference {value!r} ({what}); use one of "
                            + ", ".join(f"'@{p}'" for p in PRODUCERS)
                        )
                    if target not in present:
                        raise ValueError(
                            f"{stage}.{path}: {value!r} refers to the {target} stage, which this pipeline does not have"
                        )
                    if STAGE_ORDER.index(target) >= STAGE_ORDER.index(stage):
                        raise ValueError(
                            f"{stage}.{path}: {value!r} refers to the {target} stage, which does not run before "
                            f"{stage} (the order is always " + " → ".join(STAGE_ORDER) + ")"
                        )
                    parent = path.rsplit(".", 1)[0]
                    if "." in path and _get(dumped, f"{parent}.gguf_file"):
                        raise ValueError(
                            f"{stage}.{parent}.gguf_file: {value!r} is a stage's artifact (a Hugging "
                            f"Face directory), not a GGUF file; remove gguf_file"
                        )
                elif value in PRODUCERS and not os.path.exists(value):
                    raise ValueError(
                        f"{stage}.{path}: {value!r} is not a path ({what}); write '@{value}' for the "
                        f"{value} stage's artifact"
                    )
        return self

    def stages(self) -> list[str]:
        """The stages this pipeline runs, in order."""
        return [s for s in STAGE_ORDER if getattr(self, s) is not None]

    @property
    def directory(self) -> str:
        """``<output_dir>/<name>``: the pipeline's lineage file lives here (a local path or a URI)."""
        return join_location(self.output_dir, self.name)


def _strings(data: Any, prefix: str = ""):
    """(dotted path, value) of every string in a dumped config (lists indexed by position)."""
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _strings(v, f"{prefix}{k}.")
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _strings(v, f"{prefix}{i}.")
    elif isinstance(data, str):
        yield prefix.rstrip("."), data


def references(cfg: PipelineConfig, stage: str) -> dict[str, str]:
    """``{dotted field: '@stage'}`` of the references in ``stage``'s section."""
    section = getattr(cfg, stage).model_dump(mode="json")
    out = {}
    for s, path in REFERENCE_FIELDS:
        if s == stage and is_reference(_get(section, path)):
            out[path] = _get(section, path)
    return out
