"""Checks that run before any worker starts (and are all `raydist validate` does): no Ray, no weights."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from raydist.config.base import ModelConfig
from raydist.config.finetune import FinetuneConfig
from raydist.core import storage
from raydist.core.data import DataError, detect_format, load_records
from raydist.core.models import load_model_config, load_tokenizer, missing_lora_targets, resolve_model_source


class PreflightError(ValueError):
    """The config cannot run; the message names the problem."""


@dataclass
class PreflightReport:
    model_kind: str
    model_type: str
    max_positions: int
    data_formats: dict[str, str]
    train_records: int
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [
            f"model: {self.model_kind} ({self.model_type}, up to {self.max_positions} positions)",
            f"data: {self.train_records} records; formats {self.data_formats}",
        ]
        return out + [f"note: {n}" for n in self.notes]


def module_names(model_config) -> list[str]:
    """Module names of a model built on the meta device (no memory, no weights)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    return [n for n, _ in model.named_modules()]


def _model_parts(model_cfg, field: str):
    """(source, transformers config, tokenizer) of a model, or a PreflightError naming ``field``."""
    try:
        return resolve_model_source(model_cfg), load_model_config(model_cfg), load_tokenizer(model_cfg)
    except (ValueError, OSError) as e:
        raise PreflightError(f"{field}.path: {e}") from None


def _check_seq_lens(data_cfg, max_pos: int, whose: str) -> None:
    for name in ("seq_len", "eval_seq_len"):
        value = getattr(data_cfg, name)
        if max_pos and value is not None and value > max_pos:
            raise PreflightError(f"data.{name} {value} exceeds {whose} limit of {max_pos} positions")


def read_data(data_cfg) -> tuple[int, dict[str, str]]:
    """(train record count, formats) of the train/eval sources, or a PreflightError naming the file."""
    try:
        records = load_records(data_cfg.train)
        formats = {"train": detect_format(records, data_cfg.train)}
        if data_cfg.eval is not None:
            formats["eval"] = detect_format(load_records(data_cfg.eval), data_cfg.eval)
    except DataError as e:
        raise PreflightError(f"data: {e}") from None
    return len(records), formats


def preflight_finetune(cfg: FinetuneConfig) -> tuple[PreflightReport, Any]:
    """Check model, tokenizer, data and option compatibility. Returns the report and the tokenizer.

    Raises:
        PreflightError: with a message naming the field or file at fault.
    """
    src, model_config, tokenizer = _model_parts(cfg.model, "model")
    max_pos = int(getattr(model_config, "max_position_embeddings", 0) or 0)
    _check_seq_lens(cfg.data, max_pos, "the model's")
    if cfg.lora.enabled:
        missing = missing_lora_targets(module_names(model_config), cfg.lora.target_modules)
        if missing:
            raise PreflightError(
                f"lora.target_modules {missing} match no module of this {model_config.model_type} model "
                f"(linear layers are e.g. q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)"
            )
    n_records, formats = read_data(cfg.data)
    if formats["train"] in ("chat", "instruction") and not tokenizer.chat_template:
        notes = ["tokenizer has no chat template; using a plain 'role: content' rendering"]
    else:
        notes = []
    report = PreflightReport(
        model_kind=src.kind,
        model_type=model_config.model_type,
        max_positions=max_pos,
        data_formats=formats,
        train_records=n_records,
        notes=notes,
    )
    return report, tokenizer


def preflight_generate(cfg) -> PreflightReport:
    """Checks for `raydist generate`: the model loads its config, the prompts read, the output is new."""
    from pathlib import Path

    src, model_config, _ = _model_parts(cfg.model, "model")
    try:
        records = load_records(cfg.prompts)
        fmt = detect_format(records, cfg.prompts, require_output=False)
    except DataError as e:
        raise PreflightError(f"prompts: {e}") from None
    if fmt == "text":
        raise PreflightError("prompts: text data has no prompts; use instruction or chat records")

    if storage.exists(cfg.output if storage.is_uri(cfg.output) else Path(cfg.output).expanduser()):
        raise PreflightError(f"output {cfg.output} exists; choose another path (nothing is overwritten)")
    return PreflightReport(
        model_kind=src.kind,
        model_type=model_config.model_type,
        max_positions=int(getattr(model_config, "max_position_embeddings", 0) or 0),
        data_formats={"prompts": fmt},
        train_records=len(records),
    )


def preflight(cfg) -> PreflightReport:
    """Run the checks that fit ``cfg``'s stage (what `raydist validate` prints)."""
    if cfg.stage == "generate":
        return preflight_generate(cfg)
    if cfg.stage == "distill":
        return preflight_distill(cfg)[0]
    return preflight_finetune(cfg)[0]


def shares_vocabulary(teacher_tok, student_tok) -> bool:
    """Whether both tokenizers give every token the same id (up to the smaller vocabulary's size)."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    common = min(len(tv), len(sv))
    return {t: i for t, i in tv.items() if i < common} == {t: i for t, i in sv.items() if i < common}


def check_shared_vocabulary(teacher_tok, student_tok) -> None:
    """Logit KD compares distributions token by token, so both models must index the same vocabulary.

    Same-family models may differ only in how far the embedding is padded; the losses truncate to the
    common size. Anything else is refused here, before any worker starts.
    """
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    common = min(len(tv), len(sv))
    t_items = {tok: i for tok, i in tv.items() if i < common}
    s_items = {tok: i for tok, i in sv.items() if i < common}
    if t_items != s_items:
        differing = sorted(set(t_items.items()) ^ set(s_items.items()), key=lambda x: x[1])[:3]
        raise PreflightError(
            "student and teacher tokenizers differ (e.g. " + ", ".join(f"{t!r}->{i}" for t, i in differing) + "); "
            "logit distillation needs a shared vocabulary. Options: kd.loss: uld (universal logit distillation, "
            "compares sorted distributions across tokenizers), a student of the teacher's family, "
            "student.source: pruned (derived from the teacher), or sequence-level KD "
            "(`raydist generate` with the teacher, then `raydist finetune` the student on its answers)"
        )


def preflight_distill(cfg) -> tuple[PreflightReport, Any]:
    """Checks for `raydist distill`: teacher, student source, shared vocabulary, pruning recipe, data."""
    src, teacher_config, tokenizer = _model_parts(cfg.teacher, "teacher")
    limits = [int(getattr(teacher_config, "max_position_embeddings", 0) or 0)]
    st = cfg.student
    if st.source == "pretrained":
        _, student_config, student_tok = _model_parts(ModelConfig(path=st.path), "student")
        if cfg.kd.loss != "uld":
            check_shared_vocabulary(tokenizer, student_tok)
        limits.append(int(getattr(student_config, "max_position_embeddings", 0) or 0))
    elif st.source == "pruned":
        p = st.prune
        n_layers = teacher_config.num_hidden_layers
        n_drop = p.drop_layers if isinstance(p.drop_layers, int) else len(p.drop_layers)
        if n_drop >= n_layers:
            raise PreflightError(f"student.prune.drop_layers removes {n_drop} of the teacher's {n_layers} layers")
        bad = [i for i in ([] if isinstance(p.drop_layers, int) else p.drop_layers) if not 0 <= i < n_layers]
        if bad:
            raise PreflightError(f"student.prune.drop_layers {bad} are not layers of the teacher (0..{n_layers - 1})")
        kv = getattr(teacher_config, "num_key_value_heads", None) or teacher_config.num_attention_heads
        if p.kv_groups_keep is not None and p.kv_groups_keep > kv:
            raise PreflightError(f"student.prune.kv_groups_keep {p.kv_groups_keep} exceeds the teacher's {kv} KV heads")
    max_pos = min(x for x in limits if x) if any(limits) else 0
    _check_seq_lens(cfg.data, max_pos, "the models'")
    n_records, formats = read_data(cfg.data)
    report = PreflightReport(
        model_kind=src.kind,
        model_type=teacher_config.model_type,
        max_positions=max_pos,
        data_formats=formats,
        train_records=n_records,
        notes=[f"student: {st.source}"],
    )
    return report, tokenizer
