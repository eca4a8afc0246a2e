"""Config of the compression sweep (`raydist sweep`): a search space of pruning x quantization settings,
how to search it with Ray Tune, how to measure a candidate and how to pick the winner.

The same stage also sweeps fine-tuning hyperparameters (``target: finetune``): then ``finetune`` holds a
complete fine-tuning config and ``finetune_space`` the values tried for some of its fields.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Literal, Optional

from pydantic import Field, field_validator, model_validator

from raydist.config.base import DataSourceConfig, ModelConfig, ResourceSettings, RunSettings, StageConfig, StrictModel
from raydist.config.finetune import FinetuneConfig

PRUNE_METHODS = ("none", "magnitude", "wanda", "sparsegpt")
STRUCTURES = ("mlp", "layers", "mlp+heads")
QUANT_SCHEMES = ("none", "int8_weight_only", "int8_dynamic", "int4_weight_only")
RECOVERIES = ("none", "distill", "qat")
INT4_ALGORITHMS = ("minmax", "hqq", "gptq")
DEFAULT_INT4_ALGORITHM = "gptq"  # also what compress.candidate.apply_candidate uses when a candidate omits it
# The fields of SearchSpace a candidate is made of (every searcher samples all of them).
KNOBS = (
    "method",
    "sparsity",
    "pattern",
    "structured",
    "structure",
    "quantization",
    "quantize_lm_head",
    "smoothing_alpha",
    "group_size",
    "int4_algorithm",
    "recovery",
)


class SearchSpace(StrictModel):
    """Values tried for each knob; a candidate takes one value of each (grid: every combination)."""

    method: list[Literal["none", "magnitude", "wanda", "sparsegpt"]] = Field(
        ["none"], description="Unstructured / N:M pruning: none, magnitude, wanda (|W|·‖X‖) or sparsegpt (OBS)."
    )
    sparsity: list[float] = Field([0.5], description="Fraction of block weights zeroed, each in [0, 1).")
    pattern: list[Optional[str]] = Field(
        [None], description="None (unstructured) or 'N:M', e.g. '2:4' (sparsity N/M implied)."
    )
    structured: list[float] = Field(
        [0.0], description="Fraction of the transformer-block parameters removed structurally (0 = none), in [0, 1)."
    )
    structure: list[Literal["mlp", "layers", "mlp+heads"]] = Field(
        ["mlp"], description="What structured pruning removes: MLP channels, whole layers, or MLP channels + KV groups."
    )
    quantization: list[Literal["none", "int8_weight_only", "int8_dynamic", "int4_weight_only"]] = Field(
        ["none"], description="Weight quantization scheme of the decoder blocks (embeddings / lm_head stay float)."
    )
    quantize_lm_head: list[bool] = Field(
        [False],
        description="Also quantize the (tied) output projection with the int8 schemes (the embedding stays "
        "float); it is read once per generated token, so int8 there speeds up decoding.",
    )
    smoothing_alpha: list[float] = Field(
        [0.5],
        description="int8_dynamic: SmoothQuant's migration strength in [0, 1] (how much of the activations' "
        "outliers move into the weights).",
    )
    group_size: list[int] = Field(
        [64], description="int4 group sizes (a size that does not divide a layer is lowered)."
    )
    int4_algorithm: list[Literal["minmax", "hqq", "gptq"]] = Field(
        [DEFAULT_INT4_ALGORITHM],
        description="How int4 weights are rounded: minmax (round to nearest), hqq (optimised scales) or "
        "gptq (second-order error compensation on the calibration text).",
    )
    recovery: list[Literal["none", "distill", "qat"]] = Field(
        ["none"],
        description="Short recovery: none, distill (KD from the uncompressed model, after pruning), or qat "
        "(the same KD trained against the int4 grids: quantization-aware training; int4 only, "
        "otherwise it is distill).",
    )

    @model_validator(mode="after")
    def _valid(self) -> "SearchSpace":
        for name in KNOBS:
            if not getattr(self, name):
                raise ValueError(f"search_space.{name} is empty: give at least one value")
        if any(not (0.0 <= a <= 1.0) or math.isnan(a) for a in self.smoothing_alpha):
            raise ValueError(f"search_space.smoothing_alpha values must be in [0, 1], got {self.smoothing_alpha}")
        for name in ("sparsity", "structured"):
            bad = [v for v in getattr(self, name) if not (0.0 <= v < 1.0) or math.isnan(v)]
            if bad:
                raise ValueError(f"search_space.{name} values must be in [0, 1), got {bad}")
        for p in self.pattern:
            if p is not None:
                parts = p.split(":")
                if len(parts) != 2 or not all(x.isdigit() for x in parts) or not 0 < int(parts[0]) < int(parts[1]):
                    raise ValueError(f"search_space.pattern {p!r} is not 'N:M' with 0 < N < M (e.g. '2:4')")
        bad_groups = [g for g in self.group_size if g <= 0 or g & (g - 1)]
        if bad_groups:
            raise ValueError(f"search_space.group_size values must be powers of two, got {bad_groups}")
        return self

    def candidates(self) -> list[dict[str, Any]]:
        """Every distinct combination, with knobs that do not apply collapsed (e.g. sparsity when method is
        none, group_size unless int4), so the grid holds no duplicate models."""
        seen, out = set(), []
        knobs = KNOBS
        for values in itertools.product(*(getattr(self, k) for k in knobs)):
            c = normalize_candidate(dict(zip(knobs, values)))
            key = tuple(sorted((k, str(v)) for k, v in c.items()))
            if key not in seen:
                seen.add(key)
                out.append(c)
        return out


def normalize_candidate(c: dict[str, Any]) -> dict[str, Any]:
    """One candidate with the knobs that have no effect set to their neutral value."""
    c = dict(c)
    if c["method"] == "none":
        c["sparsity"], c["pattern"] = 0.0, None
    elif c.get("pattern"):
        n, m = (int(x) for x in c["pattern"].split(":"))
        c["sparsity"] = 1 - n / m  # implied by the pattern
    if c["structured"] == 0.0:
        c["structure"] = "none"
    int4 = c["quantization"] == "int4_weight_only"
    if not c["quantization"].startswith("int8"):
        c["quantize_lm_head"] = False  # int4 kernels and dense models keep the head float
    else:
        c["quantize_lm_head"] = bool(c.get("quantize_lm_head", False))
    alpha = c.get("smoothing_alpha")
    c["smoothing_alpha"] = (0.5 if alpha is None else float(alpha)) if c["quantization"] == "int8_dynamic" else None
    if not int4:
        c["group_size"] = None
    c["int4_algorithm"] = c.get("int4_algorithm") if int4 else None
    if c.get("recovery") == "qat" and not int4:
        c["recovery"] = "distill"  # QAT trains against int4 grids; for other schemes it is plain KD
    if c["method"] == "none" and c["structured"] == 0.0 and c.get("recovery") == "distill":
        c["recovery"] = "none"  # nothing was removed and nothing is trained against a grid: nothing to recover
    return c


class SearchSettings(StrictModel):
    """How Ray Tune walks the space."""

    algorithm: Literal["grid", "random", "optuna"] = Field(
        "grid", description="grid: every candidate once; random: num_samples draws; optuna: multi-objective TPE/NSGA."
    )
    num_samples: int = Field(8, gt=0, description="Candidates tried by random / optuna search.")
    max_concurrent: int = Field(2, gt=0, description="Trials running at once (each holds `resources`).")
    seed: int = Field(0, description="Seeds random / optuna sampling.")
    asha: bool = Field(
        True, description="Stop clearly worse candidates early (ASHA on perplexity over growing budgets)."
    )
    max_failures: int = Field(0, ge=0, description="Retries of a failed trial before it is recorded as failed.")


class EvalSettings(StrictModel):
    """How a candidate is measured."""

    data: DataSourceConfig = Field(
        default_factory=lambda: DataSourceConfig(builtin="pydoc_topics", max_tokens=4096),
        description="Held-out text for perplexity (plain text).",
    )
    window: int = Field(512, gt=1, description="Perplexity window (tokens).")
    budgets: list[int] = Field(
        [1024, 2048, 4096], description="Growing eval-token budgets; each is one ASHA rung (the last is the full eval)."
    )
    calibration: DataSourceConfig = Field(
        default_factory=lambda: DataSourceConfig(builtin="pydoc_topics", skip_tokens=50_000),
        description="Text the data-aware methods (wanda, sparsegpt, structured importance) calibrate on.",
    )
    task: Optional[DataSourceConfig] = Field(
        None,
        description="Optional instruction / chat data (e.g. seed_tasks.jsonl) for a task metric: the reference "
        "answers' perplexity and top-1 token accuracy given the prompts (teacher-forced).",
    )
    task_max_examples: int = Field(64, gt=0, description="Task examples scored (the first ones of the data).")
    task_seq_len: int = Field(512, gt=1, description="Tokens per task example (prompt + answer, truncated).")
    calibration_sequences: int = Field(16, gt=0, description="Calibration sequences.")
    calibration_seq_len: int = Field(128, gt=1, description="Tokens per calibration sequence.")
    latency_batch_sizes: list[int] = Field([1, 8], description="Batch sizes whose generation tokens/s are measured.")
    latency_prompt_tokens: int = Field(32, gt=0, description="Prompt length for the latency measurement.")
    latency_new_tokens: int = Field(32, gt=0, description="Tokens generated per prompt for the latency measurement.")
    latency_repeats: int = Field(3, gt=0, description="Timed generations per batch size (median reported).")

    @field_validator("budgets", "latency_batch_sizes")
    @classmethod
    def _increasing(cls, v: list[int]) -> list[int]:
        if not v or any(x <= 0 for x in v) or sorted(set(v)) != v:
            raise ValueError(f"must be a non-empty increasing list of positive integers, got {v}")
        return v


class RecoverySettings(StrictModel):
    """The short recovery a candidate with ``recovery: distill`` or ``qat`` gets (KD from the uncompressed model)."""

    data: DataSourceConfig = Field(
        default_factory=lambda: DataSourceConfig(builtin="pydoc_topics", skip_tokens=8192, max_tokens=40_000),
        description="Text the recovery trains on (plain text).",
    )
    steps: int = Field(
        40,
        gt=0,
        description="Optimizer steps of the recovery (what they buy on SmolLM2-135M: BENCHMARKS.md, compression).",
    )
    batch_size: int = Field(4, gt=0, description="Sequences per step.")
    seq_len: int = Field(256, gt=1, description="Tokens per sequence.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (constant).")
    temperature: float = Field(1.0, gt=0, description="KD temperature.")


class PolicySettings(StrictModel):
    """How the winner is chosen among the candidates that completed (Intel Neural Compressor style)."""

    max_quality_loss_pct: float = Field(
        5.0, ge=0, description="A candidate qualifies when its perplexity is at most this % above the base model's."
    )
    prefer: Literal["smallest", "fastest"] = Field(
        "smallest", description="Among qualifying candidates: fewest bytes on disk, or most tokens/s (batch 1)."
    )


class FinetuneSpace(StrictModel):
    """Fine-tuning hyperparameters tried when ``target: finetune`` (each list: the values tried)."""

    lr: Optional[list[float]] = Field(None, description="optim.lr values.")
    lora_r: Optional[list[int]] = Field(None, description="lora.r values (LoRA runs).")
    lora_dropout: Optional[list[float]] = Field(None, description="lora.dropout values.")
    weight_decay: Optional[list[float]] = Field(None, description="optim.weight_decay values.")

    def overrides(self) -> dict[str, list[Any]]:
        """{dotted config field: values} of the knobs given."""
        names = {
            "lr": "optim.lr",
            "lora_r": "lora.r",
            "lora_dropout": "lora.dropout",
            "weight_decay": "optim.weight_decay",
        }
        out = {names[k]: v for k, v in self.__dict__.items() if v is not None}
        for field, values in out.items():
            if not values:
                raise ValueError(f"finetune_space: {field} is an empty list")
        return out


class SweepConfig(StageConfig):
    """Everything `raydist sweep` needs."""

    stage: Literal["sweep"] = Field("sweep", description="Which stage this config drives.")
    target: Literal["compress", "finetune"] = Field(
        "compress", description="compress: prune x quantize the model; finetune: sweep a fine-tuning config."
    )
    model: Optional[ModelConfig] = Field(None, description="The model to compress (target compress).")
    search_space: SearchSpace = Field(default_factory=SearchSpace)
    search: SearchSettings = Field(default_factory=SearchSettings)
    eval: EvalSettings = Field(default_factory=EvalSettings)
    recovery: RecoverySettings = Field(default_factory=RecoverySettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    resources: ResourceSettings = Field(
        default_factory=ResourceSettings,
        description="What each trial reserves (the base measurement and the winner's "
        "re-measurement run with the same resources, so all speeds are comparable).",
    )
    keep_artifacts: Literal["pareto", "all", "winner"] = Field(
        "pareto", description="Trial artifacts kept after the sweep (the winner is always exported)."
    )
    finetune: Optional[FinetuneConfig] = Field(None, description="The fine-tuning config swept (target finetune).")
    finetune_space: Optional[FinetuneSpace] = Field(None, description="Values tried (target finetune).")
    run: RunSettings

    @model_validator(mode="after")
    def _target_fields(self) -> "SweepConfig":
        if self.target == "compress":
            if self.model is None:
                raise ValueError("target 'compress' needs `model` (the model to compress)")
            if self.finetune is not None or self.finetune_space is not None:
                raise ValueError("`finetune` / `finetune_space` belong to target 'finetune'")
            if self.eval.budgets[-1] > (self.eval.data.max_tokens or 10**12):
                raise ValueError(
                    f"eval.budgets ends at {self.eval.budgets[-1]} tokens but eval.data.max_tokens is "
                    f"{self.eval.data.max_tokens}"
                )
        else:
            ignored = [f for f in ("model", "search_space", "eval", "recovery", "policy") if f in self.model_fields_set]
            if ignored:  # refused rather than silently dropped: the fine-tuning sweep never reads them
                raise ValueError(
                    f"target 'finetune' does not use {', '.join(ignored)} (they belong to target 'compress'); the "
                    "swept config is `finetune`, the values tried `finetune_space`, the winner the lowest eval ppl"
                )
            if self.finetune is None or self.finetune_space is None:
                raise ValueError("target 'finetune' needs `finetune` (a fine-tuning config) and `finetune_space`")
            if not self.finetune_space.overrides():
                raise ValueError(
                    "finetune_space is empty: give values for at least one of lr, lora_r, lora_dropout, weight_decay"
                )
        return self
