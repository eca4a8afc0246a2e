"""Config of the fine-tuning stage (`raydist finetune`)."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from raydist.config.base import (
    DataConfig,
    DeepSpeedSettings,
    LoraSettings,
    ModelConfig,
    OptimConfig,
    ResourceSettings,
    RunSettings,
    ScalingSettings,
    StageConfig,
    StrictModel,
)


class TrainSettings(StrictModel):
    """Loop length, batch shape and cadence of eval / checkpoints / logs."""

    max_steps: Optional[int] = Field(None, gt=0, description="Optimizer steps; default: `epochs` over the data.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data when max_steps is not set.")
    micro_batch_size: int = Field(4, gt=0, description="Sequences per worker per forward pass.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches accumulated per optimizer step.")
    seed: int = Field(0, description="Seeds model init, dropout and data order.")
    dropout: Optional[float] = Field(None, ge=0, lt=1, description="Override the model's dropout probabilities.")
    eval_every: Optional[int] = Field(None, gt=0, description="Evaluate every N steps (always at the end).")
    eval_at_start: bool = Field(True, description="Evaluate once before training (the 'before' perplexity).")
    checkpoint_every: Optional[int] = Field(None, gt=0, description="Checkpoint every N steps (always at the end).")
    keep_checkpoints: int = Field(2, gt=0, description="Keep the last K checkpoints.")
    log_every: int = Field(1, gt=0, description="Print progress every N steps.")


class FinetuneConfig(StageConfig):
    """Everything `raydist finetune` needs: model, data, method, optimizer, DeepSpeed, scale, run."""

    stage: Literal["finetune"] = Field("finetune", description="Which stage this config drives.")
    model: ModelConfig
    data: DataConfig
    lora: LoraSettings = Field(default_factory=LoraSettings)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    train: TrainSettings = Field(default_factory=TrainSettings)
    deepspeed: DeepSpeedSettings = Field(default_factory=DeepSpeedSettings)
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    resources: ResourceSettings = Field(default_factory=ResourceSettings, description="What each worker reserves.")
    run: RunSettings

    @model_validator(mode="after")
    def _compatible(self) -> "FinetuneConfig":
        check_step_settings(self.optim, self.train, self.run)
        check_worker_gpus(self.resources)
        return self


def check_worker_gpus(resources: ResourceSettings) -> None:
    """Training workers hold whole GPUs: NCCL runs one rank per device."""
    g = resources.num_gpus
    if g != "auto" and g != int(g):
        raise ValueError(f"resources.num_gpus {g}: a training worker needs whole GPUs (NCCL runs one rank per GPU)")


def check_step_settings(optim: OptimConfig, train: TrainSettings, run: RunSettings) -> None:
    """Contradictions between warmup, run length and the pre-emption drill (shared by the training stages)."""
    if optim.warmup_steps is not None and train.max_steps is not None and optim.warmup_steps >= train.max_steps:
        raise ValueError(f"optim.warmup_steps ({optim.warmup_steps}) must be below train.max_steps ({train.max_steps})")
    if run.stop_after_steps is not None and train.max_steps is not None and run.stop_after_steps >= train.max_steps:
        raise ValueError("run.stop_after_steps must be below train.max_steps")
