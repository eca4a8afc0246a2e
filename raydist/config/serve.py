"""Config of the serving stage (`raydist serve`): Ray Serve hosting an artifact behind an OpenAI API."""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from raydist.config.base import ResourceSettings, StageConfig, StrictModel


class HttpSettings(StrictModel):
    """Where Serve's HTTP proxy listens (used by `raydist serve`; `serve run` takes its own options)."""

    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 exposes the server to the network.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy.")


class AuthSettings(StrictModel):
    """Optional API key: when set, every /v1 route needs `Authorization: Bearer <key>` (401 otherwise)."""

    api_key: Optional[str] = Field(None, min_length=1, description="The key itself (prefer api_key_env).")
    api_key_env: Optional[str] = Field(
        None, min_length=1, description="Name of an environment variable holding the key (read when the app is built)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> "AuthSettings":
        if self.api_key is not None and self.api_key_env is not None:
            raise ValueError("can't provide both api_key and api_key_env")
        return self


class LimitSettings(StrictModel):
    """What one request may ask for, and how much traffic a replica accepts before refusing."""

    max_body_bytes: int = Field(1 << 20, gt=0, description="Largest request body; larger bodies get 413.")
    max_prompt_tokens: int = Field(2048, gt=0, description="Longest prompt in tokens (after the chat template).")
    max_tokens: int = Field(512, gt=0, description="Largest `max_tokens` a request may ask for.")
    default_max_tokens: Optional[int] = Field(
        None,
        gt=0,
        description="`max_tokens` of a completion request that sets none; default min(16, max_tokens) "
        "(16 is OpenAI's default).",
    )
    default_chat_max_tokens: Optional[int] = Field(
        None, gt=0, description="`max_tokens` of a chat request that sets none; default min(256, max_tokens)."
    )
    max_stop_sequences: int = Field(4, gt=0, description="Most `stop` strings per request.")
    max_n: int = Field(8, gt=0, description="Most choices one prompt may ask for (`n`, and `best_of` candidates).")
    max_prompts: int = Field(
        32, gt=0, description="Most prompts in one /v1/completions request (a prompt array; decoded together)."
    )
    max_logprobs: int = Field(
        20, ge=0, description="Most alternatives per token a request may ask for (`logprobs`, `top_logprobs`)."
    )
    max_ongoing_requests: int = Field(64, gt=0, description="Requests a replica works on or waits to batch at once.")
    max_queued_requests: int = Field(
        256,
        ge=-1,
        description="Requests a replica holds beyond max_ongoing_requests, waiting for a batch slot, "
        "before new ones are refused with OpenAI's error body (-1 = no limit).",
    )
    queue_full_status: Literal[429, 503] = Field(503, description="HTTP status sent when the queue is full.")
    retry_after_s: float = Field(1.0, ge=0, description="`Retry-After` header value (seconds) of a queue-full reply.")

    @model_validator(mode="after")
    def _defaults_within_limit(self) -> "LimitSettings":
        for name in ("default_max_tokens", "default_chat_max_tokens"):
            value = getattr(self, name)
            if value is not None and value > self.max_tokens:
                raise ValueError(f"{name} ({value}) exceeds max_tokens ({self.max_tokens})")
        return self

    def admitted(self) -> Optional[int]:
        """Generation requests one replica holds at once (working + waiting); None = no limit."""
        return None if self.max_queued_requests < 0 else self.max_ongoing_requests + self.max_queued_requests

    def completion_default(self) -> int:
        """``max_tokens`` used by a completion request that gives none."""
        return self.default_max_tokens or min(16, self.max_tokens)

    def chat_default(self) -> int:
        """``max_tokens`` used by a chat request that gives none."""
        return self.default_chat_max_tokens or min(256, self.max_tokens)


class BatchingSettings(StrictModel):
    """Dynamic batching on a replica (Ray Serve's ``@serve.batch``): concurrent requests share forward passes."""

    enabled: bool = Field(True, description="Batch concurrent requests; false runs them one at a time.")
    max_batch_size: int = Field(16, gt=0, description="Most requests decoded together.")
    batch_wait_timeout_s: float = Field(
        0.0,
        ge=0,
        description="How long the first request of a group waits for others to join (every group "
        "pays it). 0: none; requests that arrive while a step runs are prefilled together anyway.",
    )


class AutoscalingSettings(StrictModel):
    """Ray Serve autoscaling by ongoing requests per replica."""

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 = scale to zero).")
    max_replicas: int = Field(2, gt=0, description="Most replicas under load.")
    target_ongoing_requests: float = Field(8.0, gt=0, description="Ongoing requests per replica Serve aims for.")
    upscale_delay_s: float = Field(30.0, ge=0, description="Load must last this long before a replica is added.")
    downscale_delay_s: float = Field(600.0, ge=0, description="Low load must last this long before one is removed.")
    look_back_period_s: float = Field(
        30.0,
        gt=0,
        description="Window over which the load is averaged (Ray warns below its 10 s metrics push "
        "interval unless RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S are lowered too).",
    )

    @model_validator(mode="after")
    def _range(self) -> "AutoscalingSettings":
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})")
        return self


class ServeResources(ResourceSettings):
    """What each replica reserves (as every stage spells it) and how it runs the model."""

    torch_threads: Optional[int] = Field(
        None, gt=0, description="torch intra-op threads; default: num_cpus rounded up."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPU, the artifact's own dtype on CPU."
    )


class HealthSettings(StrictModel):
    """Serve's replica health check (it runs a real forward pass of the model)."""

    check_period_s: float = Field(10.0, gt=0, description="Seconds between health checks.")
    check_timeout_s: float = Field(30.0, gt=0, description="A check slower than this marks the replica unhealthy.")


class ServeConfig(StageConfig):
    """Everything `raydist serve` needs: the artifact, the HTTP API's limits and auth, batching and scaling."""

    stage: Literal["serve"] = Field("serve", description="Which stage this config drives.")
    artifact: str = Field(
        ...,
        description="A raydist artifact or any Hugging Face model directory (a LoRA adapter-only "
        "directory is merged onto the base its adapter_config.json names).",
    )
    adapter: Optional[str] = Field(None, description="A peft LoRA adapter directory merged onto `artifact` at load.")
    model_name: Optional[str] = Field(
        None, min_length=1, description="Model id in /v1/models and responses; default: the artifact's run name."
    )
    app_name: str = Field("raydist", pattern=r"^[A-Za-z0-9._-]+$", description="Ray Serve application name.")
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP path prefix of the application.")
    http: HttpSettings = Field(default_factory=HttpSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    batching: BatchingSettings = Field(default_factory=BatchingSettings)
    num_replicas: Optional[int] = Field(None, gt=0, description="Fixed replica count (default 1 without autoscaling).")
    max_replicas_per_node: Optional[int] = Field(
        None, gt=0, description="Most replicas Serve places on one node (1 = a replica per node, for availability)."
    )
    autoscaling: Optional[AutoscalingSettings] = Field(None, description="Scale replicas with load instead.")
    resources: ServeResources = Field(default_factory=ServeResources)
    health: HealthSettings = Field(default_factory=HealthSettings)

    @model_validator(mode="after")
    def _compatible(self) -> "ServeConfig":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("can't provide both num_replicas and autoscaling")
        if self.batching.enabled and self.batching.max_batch_size > self.limits.max_ongoing_requests:
            raise ValueError(
                f"batching.max_batch_size ({self.batching.max_batch_size}) exceeds limits.max_ongoing_requests "
                f"({self.limits.max_ongoing_requests}): a batch could never fill"
            )
        return self
