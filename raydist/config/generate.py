"""Config of `raydist generate`: a teacher answers a prompt dataset (sequence-level KD data)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from raydist.config.base import DataSourceConfig, ModelConfig, ResourceSettings, StageConfig


class GenerateConfig(StageConfig):
    """Run a model over prompts with Ray Data batch inference and write an instruction/chat jsonl."""

    stage: Literal["generate"] = Field("generate", description="Which stage this config drives.")
    model: ModelConfig = Field(..., description="The model that writes the answers (usually the teacher).")
    prompts: DataSourceConfig = Field(
        ...,
        description="Instruction records (instruction/input) or chat records (messages; the answer "
        "continues the conversation).",
    )
    output: str = Field(..., description="The jsonl file to write; refused if it exists.")
    max_new_tokens: int = Field(128, gt=0, description="Longest answer in tokens.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy decoding; > 0 samples.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    seed: int = Field(0, description="Sampling seed (per batch: seed + batch index).")
    batch_size: int = Field(8, gt=0, description="Prompts per generate() call on an actor.")
    num_actors: int = Field(1, gt=0, description="Model replicas (Ray Data actors) generating in parallel.")
    resources: ResourceSettings = Field(default_factory=ResourceSettings, description="What each actor reserves.")
    max_prompt_tokens: int = Field(1024, gt=0, description="Longer prompts are refused (named by record index).")

    @model_validator(mode="after")
    def _prompt_format(self) -> "GenerateConfig":
        if self.prompts.format == "text":
            raise ValueError("prompts.format 'text' has no prompt/answer structure; use instruction or chat")
        return self
