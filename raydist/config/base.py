"""Config pieces shared by every stage.

Every model here is pydantic v2 with ``extra="forbid"``: a typo in YAML or on the command line fails at
load time with the field's dotted name, not an hour into a run. Every field carries a one-line help.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class StrictModel(BaseModel):
    """Base for every raydist config: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class TinyModelSpec(StrictModel):
    """Shape of the random-initialised Llama-family model used when ``model.path: tiny-random``."""

    hidden_size: int = Field(64, gt=0, description="Model width.")
    num_layers: int = Field(2, gt=0, description="Number of decoder layers.")
    num_heads: int = Field(4, gt=0, description="Attention heads.")
    num_kv_heads: int = Field(2, gt=0, description="Key/value heads (grouped-query attention).")
    intermediate_size: int = Field(128, gt=0, description="MLP inner width.")
    max_position_embeddings: int = Field(512, gt=0, description="Longest sequence the model accepts.")

    @model_validator(mode="after")
    def _heads_divide(self) -> "TinyModelSpec":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_kv_heads {self.num_kv_heads}")
        return self


class ModelConfig(StrictModel):
    """Which model to start from. One loader serves every stage (see ``raydist.core.models``)."""

    path: str = Field(
        ...,
        description="A local Hugging Face directory, a .gguf file, a hub id (online machines only), "
        "or 'tiny-random' for a small random Llama (tests).",
    )
    gguf_file: Optional[str] = Field(None, description="GGUF file name inside `path` when it is a directory.")
    tiny: TinyModelSpec = Field(default_factory=TinyModelSpec, description="Shape used by 'tiny-random'.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward to save memory.")


class DataSourceConfig(StrictModel):
    """One dataset: files on disk or a built-in corpus, in one of three shapes."""

    path: Optional[str] = Field(None, description="A .jsonl/.json/.parquet/.txt file, or a directory of them.")
    builtin: Optional[Literal["pydoc_topics"]] = Field(
        None, description="A corpus shipped with Python: 'pydoc_topics' (the stdlib's pydoc_data.topics)."
    )
    format: Literal["auto", "text", "instruction", "chat"] = Field(
        "auto", description="text (LM), instruction (instruction/input/output) or chat (messages); auto detects."
    )
    text_field: str = Field("text", description="Column holding the text for format 'text'.")
    skip_tokens: int = Field(0, ge=0, description="Text only: drop this many tokens from the token stream's start.")
    max_tokens: Optional[int] = Field(None, gt=0, description="Text only: keep at most this many tokens.")
    max_records: Optional[int] = Field(None, gt=0, description="Read at most this many records.")

    @model_validator(mode="after")
    def _one_source(self) -> "DataSourceConfig":
        if (self.path is None) == (self.builtin is None):
            raise ValueError("give exactly one of `path` or `builtin`")
        if self.builtin == "pydoc_topics" and self.format not in ("auto", "text"):
            raise ValueError("builtin 'pydoc_topics' is plain text; format must be 'auto' or 'text'")
        return self


class DataConfig(StrictModel):
    """Training and evaluation data, tokenized once by the driver and fed to workers through Ray Data."""

    train: DataSourceConfig = Field(..., description="The training data.")
    eval: Optional[DataSourceConfig] = Field(None, description="Held-out data; default: a split of `train`.")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Records held out of `train` when no `eval`.")
    max_eval_sequences: Optional[int] = Field(None, gt=0, description="Cap on eval sequences (faster evals).")
    seq_len: int = Field(512, gt=1, description="Tokens per training sequence.")
    eval_seq_len: Optional[int] = Field(None, gt=1, description="Tokens per eval window; default: seq_len.")
    packing: Optional[bool] = Field(
        None, description="Concatenate samples into full seq_len blocks. Default: on for text, off otherwise."
    )
    shuffle_buffer: int = Field(1024, ge=0, description="Rows in the per-epoch local shuffle buffer (0 = none).")


class LoraSettings(StrictModel):
    """LoRA through peft. When disabled the stage trains every parameter."""

    enabled: bool = Field(False, description="Train LoRA adapters instead of all weights.")
    r: int = Field(16, gt=0, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0, description="Scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        description="Module name suffixes that get adapters; every one must exist in the model.",
    )

    @field_validator("target_modules")
    @classmethod
    def _non_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("target_modules must name at least one module")
        return v


class OptimConfig(StrictModel):
    """AdamW with warmup then decay, stepped by DeepSpeed."""

    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="Decoupled weight decay (not on biases and norms).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam betas.")
    eps: float = Field(1e-8, gt=0, description="Adam epsilon.")
    grad_clip: Optional[float] = Field(1.0, gt=0, description="Clip the global gradient norm to this (null = off).")
    warmup_steps: Optional[int] = Field(None, ge=0, description="Linear warmup length in optimizer steps.")
    warmup_fraction: Optional[float] = Field(None, ge=0, lt=1, description="Warmup as a fraction of max_steps.")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Final lr as a fraction of the peak.")
    fused: Optional[bool] = Field(
        None,
        description="torch's fused AdamW kernel (one pass over each tensor's state; on CPU ~10x faster than the "
        "per-parameter loop torch uses by default); null = fused wherever torch supports the parameters' device.",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> "OptimConfig":
        if self.warmup_steps is not None and self.warmup_fraction is not None:
            raise ValueError("can't provide both warmup_steps and warmup_fraction")
        return self


class DeepSpeedSettings(StrictModel):
    """How DeepSpeed shards the model. The JSON config is generated from these (plus `extra`)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="ZeRO stage 0/1/2/3.")
    offload_optimizer: bool = Field(False, description="Keep optimizer state on CPU (ZeRO >= 1).")
    offload_params: bool = Field(False, description="Keep parameters on CPU (ZeRO-3 only).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed config merged over ours.")

    @model_validator(mode="after")
    def _compatible(self) -> "DeepSpeedSettings":
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("offload_optimizer needs zero_stage >= 1")
        return self


class ScalingSettings(StrictModel):
    """How many Ray Train workers and how Ray places them (what each one reserves: ``resources``)."""

    num_workers: int = Field(2, gt=0, description="Data-parallel workers (one process each).")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray placement of the workers: PACK fills a node first; STRICT_SPREAD puts every "
        "worker on its own node.",
    )


class ResourceSettings(StrictModel):
    """What Ray reserves for each unit of a stage (a train / distill worker, a sweep trial, a generate actor, a
    serve replica). The unit decides its device itself, from what Ray gave it."""

    num_cpus: float = Field(1.0, gt=0, description="CPUs Ray reserves per unit.")
    num_gpus: Union[Literal["auto"], float] = Field(
        "auto",
        description="GPUs per unit: a number (fractions share a GPU where Ray allows it: sweep trials, serve "
        "replicas) or auto (1 when the cluster has a GPU for every unit, else 0).",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="What a unit computes on: auto = CUDA when Ray assigned it a GPU, else CPU; cpu = CPU "
        "even with a GPU assigned; cuda = refuse to run without one.",
    )

    @field_validator("num_gpus")
    @classmethod
    def _non_negative(cls, v):
        if v != "auto" and (v < 0 or v != v):
            raise ValueError(f"num_gpus must be >= 0 or 'auto', got {v}")
        return v


class JobSettings(StrictModel):
    """How `raydist submit` runs this config as a Ray job (ignored when the stage runs directly)."""

    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the job's driver and every worker it starts."
    )
    python: str = Field(
        "python",
        min_length=1,
        description="Interpreter the job's entrypoint runs with on the "
        "cluster (a bare name is looked up on the head node's PATH).",
    )
    files: list[str] = Field(
        default_factory=list,
        description="Extra local files / directories shipped in the "
        "job's working_dir (the data files the config names are shipped anyway).",
    )


# Keys that were renamed; a config still using one is told the new spelling instead of "unknown field".
RENAMED_KEYS = {
    ("scaling", "use_gpu"): "resources.num_gpus (0, a number, or auto)",
    ("scaling", "cpus_per_worker"): "resources.num_cpus",
    ("search", "cpus_per_trial"): "resources.num_cpus",
    ("search", "gpus_per_trial"): "resources.num_gpus",
    ("resources", "use_gpu"): "resources.num_gpus (0, a number, or auto)",
    ("use_gpu",): "resources.num_gpus (0, a number, or auto)",
    ("device",): "resources.device",
}


class StageConfig(StrictModel):
    """Base of every stage's config: the ``job`` section and the renamed-key messages."""

    job: JobSettings = Field(default_factory=JobSettings, description="How `raydist submit` runs this config.")

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for path, new in RENAMED_KEYS.items():
                node: Any = data
                for key in path[:-1]:
                    node = node.get(key) if isinstance(node, dict) else None
                if isinstance(node, dict) and path[-1] in node and not _is_current_field(cls, path):
                    raise ValueError(f"{'.'.join(path)} was renamed: use {new}")
        return data


def _is_current_field(cls, path: tuple[str, ...]) -> bool:
    """Whether ``path`` is still a field of ``cls`` (e.g. a stage that keeps a top-level ``device``)."""
    model = cls
    for key in path:
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return False
        model = field.annotation
    return True


class RunSettings(StrictModel):
    """Where the run lives and how it recovers. These fields may change between a run and its resume."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9._-]+$", description="Run name: the directory under output_dir.")
    output_dir: str = Field("runs", description="Parent of run directories (shared storage on a cluster).")
    resume: Literal["auto", "never"] = Field(
        "auto", description="auto: continue an existing run with the same config; never: refuse an existing dir."
    )
    max_failures: int = Field(2, ge=-1, description="Worker failures Ray Train recovers from (-1 = unlimited).")
    stop_after_steps: Optional[int] = Field(
        None, gt=0, description="Checkpoint and exit after this many steps (pre-emption drill); rerun to resume."
    )
