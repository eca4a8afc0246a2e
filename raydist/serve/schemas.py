"""OpenAI API request and response bodies (the subset raydist serves), as pydantic v2 models.

Requests are strict: unknown fields are refused with OpenAI's own wording ("Unrecognized request argument
supplied: ..."), types are not coerced ("5" is not an int, true is not 1, NaN is not a number), and
fields that OpenAI defines but this server does not implement (``n > 1``, ``logprobs``, ``tools``, ...)
are refused by name instead of being silently ignored.
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

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
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
    return APIError(400, "; ".join(parts[:5]) + (f"; ... and {len(parts) - 5} more" if len(parts) > 5 else ""),
                    param=first)


# -- requests --------------------------------------------------------------------------------------

_INT64 = 2**63


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, protected_namespaces=())


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by completions and chat completions."""

    model: Optional[str] = Field(None, max_length=256)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    n: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=-_INT64, lt=_INT64)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = Field(None, max_length=256, description="End-user id (accepted, not used).")

    @model_validator(mode="after")
    def _unsupported_shared(self):
        if self.n is not None and self.n != 1:
            raise ValueError(f"n: only n=1 is supported (got {self.n}); send separate requests, the server batches them")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise ValueError(f"{name}: not supported by this server (only 0)")
        if self.logit_bias:
            raise ValueError("logit_bias: not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream=true")
        return self

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
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise ValueError("echo: not supported by this server")
        if self.logprobs is not None:
            raise ValueError("logprobs: not supported by this server")
        if self.best_of is not None and self.best_of != 1:
            raise ValueError(f"best_of: only 1 is supported (got {self.best_of})")
        if self.suffix is not None:
            raise ValueError("suffix: not supported by this server")
        return self

    def single_prompt(self) -> Union[str, list[int]]:
        """The one prompt of the request: a string or a list of token ids.

        Raises:
            APIError: an array of several prompts (one prompt per request; concurrent requests are batched).
        """
        p = self.prompt
        if isinstance(p, str):
            return p
        if not p:
            return ""
        if isinstance(p[0], int):
            return p  # type: ignore[return-value]
        if len(p) != 1:
            raise APIError(400, f"prompt: arrays of {len(p)} prompts are not supported; send one request per "
                           "prompt (concurrent requests are batched on the server)", param="prompt")
        return p[0]  # type: ignore[return-value]


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
        if self.logprobs:
            raise ValueError("logprobs: not supported by this server")
        if self.top_logprobs is not None:
            raise ValueError("top_logprobs: not supported by this server")
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(self, name) not in (None, [], "none"):
                raise ValueError(f"{name}: tool calling is not supported by this server")
        if (self.max_tokens is not None and self.max_completion_tokens is not None
                and self.max_tokens != self.max_completion_tokens):
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
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


FinishReason = Literal["stop", "length"]


class CompletionChoice(BaseModel):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: Optional[FinishReason] = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class ChatDelta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: Optional[FinishReason] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Optional[Usage] = None
    system_fingerprint: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "raydist"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
