"""OpenAI's request schemas for ``/v1/completions`` and ``/v1/chat/completions`` (field for field;
``top_k`` and ``ignore_eos`` are the usual server extensions). Unknown fields are refused (400):
a field the server would ignore is a silent wrong answer. Fields OpenAI defines that this server
does not implement (``n`` > 1, ``best_of``, ``echo``, ``suffix``, ``logit_bias``, tools) answer
400 naming the field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)
    n: int | None = Field(default=None, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_call_id... are passed to the template as they are
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: bool = True


def unsupported(req: _Common) -> str | None:
    """The first field this server refuses to honour, as a message (None: all fine)."""
    if req.n not in (None, 1):
        return "n > 1 is not supported (send n requests)"
    if req.logit_bias:
        return "logit_bias is not supported"
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            return "best_of > 1 is not supported"
        if req.echo:
            return "echo is not supported"
        if req.suffix:
            return "suffix is not supported"
    if isinstance(req, ChatRequest):
        if req.tools or req.tool_choice not in (None, "none"):
            return "tools are not supported"
        if req.response_format and req.response_format.get("type") != "text":
            return "response_format other than text is not supported"
        if req.logprobs is False and req.top_logprobs:
            return "top_logprobs needs logprobs: true"
    return None
