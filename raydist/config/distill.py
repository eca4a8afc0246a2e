"""Config of the distillation stage (`raydist distill`): teacher → student on Ray Train + DeepSpeed."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import Field, model_validator

from raydist.config.base import (
    DataConfig,
    DeepSpeedSettings,
    ModelConfig,
    OptimConfig,
    ResourceSettings,
    RunSettings,
    ScalingSettings,
    StageConfig,
    StrictModel,
    TinyModelSpec,
)
from raydist.config.finetune import TrainSettings, check_step_settings, check_worker_gpus


class PruneSettings(StrictModel):
    """Minitron-style structured pruning that derives the student from the teacher."""

    drop_layers: Union[int, list[int]] = Field(
        0, description="Layers to remove: a count (least important first) or indices."
    )
    mlp_keep_ratio: float = Field(1.0, gt=0, le=1, description="Fraction of MLP channels kept (by activation).")
    kv_groups_keep: Optional[int] = Field(None, gt=0, description="Attention KV groups kept (GQA-aware); null = all.")
    hidden_keep_ratio: float = Field(1.0, gt=0, le=1, description="Fraction of hidden (embedding) channels kept.")
    multiple_of: int = Field(1, gt=0, description="Round kept widths to a multiple of this (kernel-friendly).")
    calibration_batches: int = Field(8, gt=0, description="Training sequences used to rank importance.")


class StudentConfig(StrictModel):
    """Where the student comes from."""

    source: Literal["pruned", "pretrained", "config"] = Field(
        "pruned", description="pruned: derived from the teacher; pretrained: `path`; config: random init of `tiny`."
    )
    path: Optional[str] = Field(None, description="A pretrained student (HF dir / .gguf) for source 'pretrained'.")
    tiny: Optional[TinyModelSpec] = Field(None, description="Shape of a random Llama student for source 'config'.")
    prune: PruneSettings = Field(default_factory=PruneSettings, description="Pruning recipe for source 'pruned'.")

    @model_validator(mode="after")
    def _source_fields(self) -> "StudentConfig":
        if self.source == "pretrained" and not self.path:
            raise ValueError("source 'pretrained' needs `path`")
        if self.source == "config" and self.tiny is None:
            raise ValueError("source 'config' needs `tiny` (the student's shape)")
        if self.source != "pretrained" and self.path:
            raise ValueError(f"`path` is only used with source 'pretrained' (source is {self.source!r})")
        return self


class HiddenLossSettings(StrictModel):
    """Optional hidden-state matching (student layer → teacher layer)."""

    weight: float = Field(0.0, ge=0, description="Weight of the hidden-state loss (0 = off).")
    kind: Literal["mse", "cosine"] = Field("mse", description="Distance between mapped hidden states.")
    mapping: Optional[list[tuple[int, int]]] = Field(
        None, description="(student_layer, teacher_layer) pairs of hidden_states indices; default evenly spaced."
    )


DRAWN_ENTRIES = ("sampled", "top_k_tail")  # cache entries drawn from the teacher's distribution


class OnPolicySettings(StrictModel):
    """On-policy distillation (GKD): the student samples completions of the data's prompts, the teacher scores them."""

    lmbda: float = Field(
        0.0, ge=0, le=1, description="Fraction of micro-batches whose completions the student generates (0 = off)."
    )
    max_new_tokens: int = Field(64, gt=0, description="Longest completion the student samples.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature of the student's completions (0 = greedy).")
    loss: Literal["reverse_kl", "jsd", "forward_kl"] = Field(
        "reverse_kl", description="Divergence on the student's own tokens (jsd uses `beta`)."
    )
    beta: float = Field(0.5, ge=0, le=1, description="Generalized JSD mixture weight for loss 'jsd'.")
    start_step: int = Field(
        0,
        ge=0,
        description="Optimizer steps trained on the dataset's responses (off-policy KD) before on-policy batches "
        "begin: a warm start, as recipes that distil on-policy from a fine-tuned student do (0 = from the start).",
    )


class KDSettings(StrictModel):
    """The distillation objective."""

    loss: Literal["forward_kl", "reverse_kl", "jsd", "uld"] = Field(
        "forward_kl",
        description="Logit divergence; uld (universal logit distillation) also works across tokenizers.",
    )
    temperature: float = Field(1.0, gt=0, description="Softmax temperature of both models (loss scaled by T²).")
    beta: float = Field(0.5, ge=0, le=1, description="Generalized JSD mixture weight (0 = forward KL, 1 = reverse KL).")
    ce_weight: float = Field(0.0, ge=0, le=1, description="Loss = (1 - w)·KD + w·cross-entropy on the labels.")
    hidden: HiddenLossSettings = Field(default_factory=HiddenLossSettings)
    teacher_mode: Literal["online", "cache"] = Field(
        "online", description="online: the teacher runs in every worker; cache: train from its stored top-k."
    )
    cache_dir: Optional[str] = Field(
        None, description="Teacher cache directory; default <output_dir>/teacher_cache/<name>."
    )
    top_k: int = Field(64, gt=0, description="Teacher log-probabilities kept per token in the cache.")
    cache_entries: Literal["top_k", "sampled", "top_k_tail", "last_hidden"] = Field(
        "top_k",
        description="What the cache keeps per token: the teacher's top_k log-probabilities plus the leftover mass "
        "(a lower bound of the KD loss, any kd.loss); or top_k draws from the teacher's distribution as distinct "
        "tokens and counts (random-sampling KD: an unbiased forward-KL gradient; kd.loss forward_kl only); or "
        "top_k_tail: the exact top top_k - cache_tail_draws plus cache_tail_draws draws from the rest (unbiased, "
        "the sampling noise confined to the tail; forward_kl only); or last_hidden: the teacher's last hidden state, "
        "from which the workers recompute its full logits with its output layer (stored with the cache): the "
        "online teacher's loss exactly, any kd.loss, at 2 x hidden_size bytes per token (float16); top_k and "
        "temperature do not enter the cache.",
    )
    cache_tail_draws: Optional[int] = Field(
        None,
        gt=0,
        description="With cache_entries top_k_tail: how many of the top_k slots are draws from the tail "
        "(default top_k // 2).",
    )
    cache_precision: Literal["float16", "float32"] = Field(
        "float16",
        description="How the cache stores log-probabilities or hidden states (float16 halves them; ids take 2 "
        "bytes when the vocabulary fits).",
    )
    cache_head_dtype: Optional[Literal["float32", "bfloat16"]] = Field(
        None,
        description="With cache_entries last_hidden: the precision of the teacher output layer's matmul in the "
        "workers (default: the training's, bfloat16 under train.bf16, else float32). bfloat16 is faster on CPUs with "
        "bfloat16 matrix units (Intel AMX: Sapphire Rapids and later) and can be slower on CPUs without them; it "
        "rounds the teacher's logits to bfloat16.",
    )
    cache_actors: int = Field(1, gt=0, description="Teacher replicas (Ray Data actors) building the cache.")
    cache_batch_size: int = Field(8, gt=0, description="Sequences per teacher forward while building the cache.")
    on_policy: OnPolicySettings = Field(
        default_factory=OnPolicySettings,
        description="Student-generated completions for a fraction of the batches (their loss: on_policy.loss; "
        "ce_weight applies to the dataset's responses only).",
    )

    @model_validator(mode="after")
    def _cache_compatible(self) -> "KDSettings":
        if self.teacher_mode == "cache" and self.hidden.weight > 0:
            raise ValueError("the hidden-state loss needs the online teacher (a cache keeps the last layer only)")
        if self.loss == "uld" and (self.teacher_mode == "cache" or self.hidden.weight > 0 or self.on_policy.lmbda > 0):
            raise ValueError(
                "kd.loss uld runs with the online teacher, without the hidden-state loss and off-policy "
                "(teacher_mode: online, hidden.weight: 0, on_policy.lmbda: 0)"
            )
        if self.teacher_mode == "cache" and self.cache_entries in DRAWN_ENTRIES and self.loss != "forward_kl":
            raise ValueError(
                f"kd.cache_entries {self.cache_entries} gives an unbiased gradient for kd.loss forward_kl only, not "
                f"{self.loss!r} (use cache_entries: top_k for reverse_kl / jsd)"
            )
        if self.cache_tail_draws is not None and self.cache_entries != "top_k_tail":
            raise ValueError(
                f"kd.cache_tail_draws applies to cache_entries top_k_tail only (cache_entries is {self.cache_entries})"
            )
        if self.cache_head_dtype is not None and self.cache_entries != "last_hidden":
            raise ValueError(
                f"kd.cache_head_dtype applies to cache_entries last_hidden only (cache_entries is "
                f"{self.cache_entries}): the other caches store the teacher's log-probabilities"
            )
        if self.cache_entries == "top_k_tail" and not 0 < self.tail_draws < self.top_k:
            raise ValueError(
                f"kd.cache_tail_draws must leave at least one exact entry and draw at least one: 0 < "
                f"{self.tail_draws} < top_k ({self.top_k})"
            )
        if self.teacher_mode == "cache" and self.on_policy.lmbda > 0:
            raise ValueError(
                "kd.on_policy needs the online teacher (teacher_mode: online): a cache cannot score tokens the "
                "student writes during training"
            )
        return self

    @property
    def tail_draws(self) -> int:
        """How many cache slots per token are draws from the tail (top_k_tail; 0 for the other kinds)."""
        if self.cache_entries != "top_k_tail":
            return 0
        return self.cache_tail_draws if self.cache_tail_draws is not None else self.top_k // 2


class DistillConfig(StageConfig):
    """Everything `raydist distill` needs."""

    stage: Literal["distill"] = Field("distill", description="Which stage this config drives.")
    teacher: ModelConfig = Field(..., description="The teacher (fine-tune it on the data first: 'teacher correction').")
    student: StudentConfig = Field(default_factory=StudentConfig)
    data: DataConfig
    kd: KDSettings = Field(default_factory=KDSettings)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainSettings = Field(default_factory=TrainSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    resources: ResourceSettings = Field(
        default_factory=ResourceSettings, description="What each worker (and each teacher-cache actor) reserves."
    )
    run: RunSettings

    @model_validator(mode="after")
    def _compatible(self) -> "DistillConfig":
        check_step_settings(self.optim, self.train, self.run)
        check_worker_gpus(self.resources)
        train = self.data.train
        if self.kd.on_policy.lmbda > 0 and (train.format == "text" or train.builtin or self.data.packing):
            raise ValueError(
                "kd.on_policy needs prompts to complete: use instruction or chat data (data.train.format) "
                "without packing"
            )
        op, steps = self.kd.on_policy, self.train.max_steps
        if op.lmbda > 0 and op.start_step > 0 and steps is not None and op.start_step >= steps:
            raise ValueError(
                f"kd.on_policy.start_step ({op.start_step}) must be below train.max_steps ({steps}): "
                "no on-policy batch would run"
            )
        return self
