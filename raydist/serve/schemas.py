"""OpenAI API request and response bodies (the subset raydist serves), as pydantic v2 models.

Requests are strict: unknown fields are refused with OpenAI's own wording ("Unrecognized request argument
supplied: ..."), types are not coerced ("5" is not an int, true is not 1, NaN is not a number), and
fields that OpenAI defines but this server does not implement are refused by name instead of being silently
ignored; they are listed in one place, :data:`REFUSED_FIELDS`. Limits that depend on the server's config
(``n``, ``logprobs``, the number of prompts) are checked by the service.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# -- errors ----------------------------------------------------------------------------------------


class APIError(Exception):
    """An error the server answers with an OpenAI-style body ``{"error": {...}}``.

    Args:
        status: HTTP status code.
        message: what went wrong, naming the offending field or value.
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``, ...).
        param: the request field at fault, if any.
        code: a machine-readable code (``invalid_api_key``, ``context_length_exceeded``, ...).
        headers: extra response headers (``WWW-Authenticate``, ``Retry-After``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(
    message: str, type: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None
) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


_UNION_HINTS = {
    "prompt": "must be a string, an array of token ids, or a one-element array of either",
    "stop": "must be a string or an array of strings",
}


def validation_error_to_api_error(err: ValidationError) -> APIError:
    """Turn a pydantic error into one 400 that names every bad field (the first one becomes ``param``).

    Alternatives of a union (``prompt`` may be a string or token ids) fail together; they are reported once,
    under the field's name.
    """
    by_field: dict[str, list[str]] = {}
    for e in err.errors():
        loc = [str(x) for x in e["loc"]]
        msg = e["msg"].removeprefix("Value error, ")
        if not loc and re.match(r"^\w+: ", msg):  # a model-level check names its field first
            loc = [msg.split(":", 1)[0]]
            msg = msg.split(":", 1)[1].strip()
        field = loc[0] if loc else ""
        if e["type"] == "extra_forbidden":
            text = f"Unrecognized request argument supplied: {'.'.join(loc)}"
        else:
            where = ".".join(x for x in loc if not re.search(r"[\[\]]|^function-", x))
            text = f"{where}: {msg}" if where else msg
        by_field.setdefault(field, []).append(text)
    parts = []
    for field, texts in by_field.items():
        if len(texts) > 1 and field in _UNION_HINTS:
            parts.append(f"{field}: {_UNION_HINTS[field]}")
        elif len(texts) > 1:
            parts.append(f"{texts[0]} (and {len(texts) - 1} more problems in {field})")
        else:
            parts.append(texts[0])
    first = next(iter(by_field), "") or None
    return APIError(
        400, "; ".join(parts[:5]) + (f"; ... and {len(parts) - 5} more" if len(parts) > 5 else ""), param=first
    )


# -- requests --------------------------------------------------------------------------------------

_INT64 = 2**63

# Fields of OpenAI's API this server refuses (a 400 naming the field), and why. README "Serving" lists them.
REFUSED_FIELDS = {
    "suffix": "/v1/completions: insertion (fill-in-the-middle) needs a model trained for it",
    "tools / tool_choice / functions / function_call": "/v1/chat/completions: tool calling is not implemented",
    "response_format": '/v1/chat/completions: only {"type": "text"} (no JSON mode or schemas)',
    "best_of with stream": "/v1/completions: the best candidates are only known at the end (as OpenAI)",
}


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, protected_namespaces=())


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: Optional[str] = Field(None, max_length=256)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: Optional[int] = Field(None, ge=1)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-_INT64, lt=_INT64)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = Field(None, max_length=256, description="End-user id (accepted, not used).")

    @model_validator(mode="after")
    def _shared_checks(self):
        for key, bias in (self.logit_bias or {}).items():
            if not re.fullmatch(r"\d{1,10}", key):
                raise ValueError(f"logit_bias: keys are token ids (decimal strings), got {key[:32]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias: the bias of token {key} must be in [-100, 100], got {bias}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self

    def choices_per_prompt(self) -> int:
        return self.n or 1

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


Prompt = Union[str, list[int], list[str], list[list[int]]]


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: Prompt
    max_tokens: Optional[int] = Field(None, ge=1)
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0)
    best_of: Optional[int] = Field(None, ge=1)
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.best_of is not None and self.best_of < self.choices_per_prompt():
            raise ValueError(f"best_of: must be at least n ({self.choices_per_prompt()}), got {self.best_of}")
        if self.stream and self.candidates_per_prompt() > self.choices_per_prompt():
            raise ValueError("best_of: cannot be combined with stream (the best candidates are known only at the end)")
        if self.suffix is not None:
            raise ValueError("suffix: not supported by this server")
        return self

    def candidates_per_prompt(self) -> int:
        """Generations per prompt (``best_of``, default ``n``); the ``n`` likeliest are returned."""
        return self.best_of or self.choices_per_prompt()

    def prompts(self) -> list[Union[str, list[int]]]:
        """The request's prompts, each a string or a list of token ids (a lone string or id list is one)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            return [""]
        if isinstance(p[0], int):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class TextContentPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextContentPart]]
    name: Optional[str] = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Request):
    type: Literal["text"]


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    parallel_tool_calls: Optional[bool] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Any] = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs=true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs: must be in [0, 20], got {self.top_logprobs}")
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(self, name) not in (None, [], "none"):
                raise ValueError(f"{name}: tool calling is not supported by this server")
        if (
            self.max_tokens is not None
            and self.max_completion_tokens is not None
            and self.max_tokens != self.max_completion_tokens
        ):
            raise ValueError("max_tokens and max_completion_tokens disagree; give one of them")
        return self

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def conversation(self) -> list[dict[str, str]]:
        """Messages as ``{"role", "content"}`` dicts for the chat template (``developer`` acts as ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


# -- responses -------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> "Usage":
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


FinishReason = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """``choices[].logprobs`` of a completion: per token its text, log-probability, likeliest alternatives
    (a dict text -> logprob, the token itself included) and character offset in the choice's text. With
    ``echo`` the prompt's tokens come first, the very first with ``null`` (nothing precedes it)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def extend(self, other: "CompletionLogprobs") -> "CompletionLogprobs":
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(self, name).extend(getattr(other, name))
        return self


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[FinishReason] = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: Optional[str] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None
    refusal: Optional[list[ChatTokenLogprob]] = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: Optional[FinishReason] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raydist"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# -- tokenizer routes (vLLM's: what lm-eval's remote tokenizer and vLLM clients call) -----------------


class TokenizeRequest(_Request):
    """``POST /tokenize``: a prompt, or chat messages rendered with the model's chat template."""

    model: Optional[str] = Field(None, max_length=256)
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("prompt: give exactly one of prompt and messages")
        return self


class DetokenizeRequest(_Request):
    """``POST /detokenize``."""

    model: Optional[str] = Field(None, max_length=256)
    tokens: list[int]
