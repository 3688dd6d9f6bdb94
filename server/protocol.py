"""Request schemas of the OpenAI-compatible API (pydantic), and their translation to SamplingParams.

Types are strict (a string is not a number, 1.0 is not an integer, NaN and infinities are refused) so a
wrong type is a 400 naming the field rather than a silently converted value. Unknown fields are ignored,
as OpenAI does; known OpenAI fields this server cannot honour are refused with a 400 that names them
(``unsupported_fields``). Ranges are checked once, by SamplingParams, so the engine and the server agree.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..engine.sampling_params import SamplingParams

_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

# seed range accepted by torch generators after the engine's mixing; wider ints are a client bug.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _CONFIG

    model: Optional[str] = Field(None, description="served model name; omitted: the served model")
    max_tokens: Optional[int] = Field(None, description="most tokens to generate")
    temperature: Optional[float] = Field(None, description="0 = greedy; default 1")
    top_p: Optional[float] = None
    top_k: Optional[int] = Field(None, description="-1 or 0: off")
    min_p: Optional[float] = None
    n: Optional[int] = Field(None, description="completions per prompt")
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[int]] = None
    seed: Optional[int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    repetition_penalty: Optional[float] = None
    ignore_eos: Optional[bool] = False
    min_tokens: Optional[int] = None
    include_stop_str_in_output: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    user: Optional[str] = None
    # Known OpenAI fields this server cannot honour; a value that asks for them is refused.
    logit_bias: Optional[dict[str, Any]] = None
    best_of: Optional[int] = None

    def check_supported(self) -> None:
        from .errors import APIError

        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise APIError(400, "best_of is not supported by this server (only best_of == n)", param="best_of")
        for name, why in self.unsupported_fields():
            raise APIError(400, f"{name} is not supported by this server{why}", param=name)

    def unsupported_fields(self) -> list[tuple[str, str]]:
        return []

    def sampling_params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        """SamplingParams of this request (raises RequestError naming the field for out-of-range values)."""
        def pick(value, default):
            return default if value is None else value

        return SamplingParams(
            n=pick(self.n, 1), max_tokens=max_tokens, min_tokens=pick(self.min_tokens, 0),
            temperature=pick(self.temperature, 1.0), top_p=pick(self.top_p, 1.0), top_k=pick(self.top_k, -1),
            min_p=pick(self.min_p, 0.0), presence_penalty=pick(self.presence_penalty, 0.0),
            frequency_penalty=pick(self.frequency_penalty, 0.0),
            repetition_penalty=pick(self.repetition_penalty, 1.0), seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=bool(self.ignore_eos), logprobs=logprobs,
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            skip_special_tokens=pick(self.skip_special_tokens, True))

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


PromptType = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(SamplingFields):
    prompt: PromptType = Field(..., description="a string, a list of strings, token ids, or a list of token-id lists")
    logprobs: Optional[int] = Field(None, description="top logprobs per token (0..20)")
    echo: Optional[bool] = False
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_shape(cls, value: Any) -> Any:
        shape = ("prompt must be a string, a list of strings, a list of token ids, or a list of token-id lists")
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(shape)
        if not value:
            raise ValueError("prompt must not be an empty list")
        if all(isinstance(v, str) for v in value):
            return value
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        if all(isinstance(v, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in v) for v in value):
            if any(not v for v in value):
                raise ValueError("prompt token-id lists must not be empty")
            return value
        raise ValueError(shape)

    def unsupported_fields(self) -> list[tuple[str, str]]:
        out = []
        if self.suffix:
            out.append(("suffix", ""))
        if self.echo and self.logprobs is not None:
            out.append(("logprobs", " together with echo (prompt logprobs are not computed)"))
        return out

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (each text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = _CONFIG
    type: str
    text: Optional[str] = None


class ChatMessage(BaseModel):
    model_config = _CONFIG
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("content must be a string or a list of content parts")
        for part in value:
            if not isinstance(part, dict) or "type" not in part:
                raise ValueError("each content part must be an object with a 'type'")
            if part["type"] != "text":
                raise ValueError(f"content parts of type {part['type']!r} are not supported (only 'text')")
            if not isinstance(part.get("text"), str):
                raise ValueError("a text content part needs a string 'text'")
        return value

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content)


class ResponseFormat(BaseModel):
    model_config = _CONFIG
    type: str


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(..., description="the conversation (system/developer/user/assistant)")
    max_completion_tokens: Optional[int] = Field(None, description="alias of max_tokens (wins if both given)")
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, description="alternatives per token (0..20); needs logprobs")
    # Known OpenAI fields that this server cannot honour.
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    functions: Optional[list[Any]] = None
    function_call: Optional[Union[str, dict[str, Any]]] = None
    response_format: Optional[ResponseFormat] = None
    audio: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    prediction: Optional[dict[str, Any]] = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, value: list[ChatMessage]) -> list[ChatMessage]:
        if not value:
            raise ValueError("messages must not be empty")
        for m in value:
            if m.content is None and m.role != "assistant":
                raise ValueError(f"a {m.role} message needs content")
        return value

    def unsupported_fields(self) -> list[tuple[str, str]]:
        out = []
        if self.tools:
            out.append(("tools", " (no tool calling)"))
        if self.tool_choice not in (None, "none", "auto"):
            out.append(("tool_choice", " (no tool calling)"))
        if self.functions:
            out.append(("functions", " (no function calling)"))
        if self.function_call not in (None, "none", "auto"):
            out.append(("function_call", " (no function calling)"))
        if self.response_format is not None and self.response_format.type != "text":
            out.append(("response_format", f" (type {self.response_format.type!r}; only 'text')"))
        if self.audio is not None:
            out.append(("audio", ""))
        if self.modalities is not None and any(m != "text" for m in self.modalities):
            out.append(("modalities", " (only 'text')"))
        if self.prediction is not None:
            out.append(("prediction", ""))
        if self.top_logprobs is not None and not self.logprobs:
            out.append(("top_logprobs", " without logprobs=true"))
        return out

    def conversation(self) -> list[dict[str, str]]:
        """Messages as the chat template wants them (developer -> system: templates know system)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class TokenizeRequest(BaseModel):
    model_config = _CONFIG
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: Optional[bool] = True


class DetokenizeRequest(BaseModel):
    model_config = _CONFIG
    model: Optional[str] = None
    tokens: list[int]


REQUEST_MODELS = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
