"""Request schemas of the OpenAI-compatible API (pydantic), and their translation to SamplingParams.

Types are strict (a string is not a number, 2.5 is not an integer, NaN and infinities are refused) so a
wrong type is a 400 naming the field rather than a silently converted value; a whole number written as 2.0 is
an integer, as JSON Schema says. Unknown fields are ignored, as OpenAI does; known OpenAI fields this server
cannot honour are refused with a 400 that names them (``unsupported_fields``). Ranges are checked once, by
SamplingParams, so the engine and the server agree; the OpenAPI document states them too (``_doc``: JSON-schema
keywords that are documentation only), and the server fills in the model's limits (token ids: ``x-token-id``)
when it serves /openapi.json.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Discriminator, Field, field_validator

from ..engine.sampling_params import LOGIT_BIAS_MAX, SamplingParams
from ..engine.structured_output import StructuredOutput

_CONFIG = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

# seed range accepted by torch generators after the engine's mixing; wider ints are a client bug.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
TOKEN_ID = "x-token-id"  # marks token-id integers in the schema; the server adds their maximum (vocabulary - 1)
NAME_PATTERN = r"^[a-zA-Z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names
TOKEN_ID_KEY = r"^(0|[1-9][0-9]{0,9})$"  # a logit_bias key: a token id as a decimal string


def _whole_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_whole_number)]


def _rules(*rules: dict) -> ConfigDict:
    """The strict config, with request rules that relate two fields stated in the schema (if/then)."""
    return ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, json_schema_extra={"allOf": list(rules)})


def _when(field: str, schema: dict, then: dict | bool) -> dict:
    return {"if": {"required": [field], "properties": {field: schema}}, "then": then}


STREAM_OPTIONS_NEED_STREAM = _when("stream_options", {"type": "object"},
                                   {"required": ["stream"], "properties": {"stream": {"const": True}}})


def _doc(**keywords) -> dict:
    """JSON-schema keywords for the OpenAPI document only (SamplingParams does the checking)."""
    return {"json_schema_extra": keywords}


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, populate_by_name=True)
    name: str = Field(..., pattern=NAME_PATTERN)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema", description="the JSON schema; omitted: any "
                                              "JSON object")
    strict: Optional[bool] = None


class TextFormat(BaseModel):
    model_config = _CONFIG
    type: Literal["text"]


class JSONObjectFormat(BaseModel):
    model_config = _CONFIG
    type: Literal["json_object"]


class JSONSchemaResponseFormat(BaseModel):
    model_config = _CONFIG
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat = Annotated[Union[TextFormat, JSONObjectFormat, JSONSchemaResponseFormat], Discriminator("type")]


class StreamOptions(BaseModel):
    model_config = _CONFIG
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = _rules(STREAM_OPTIONS_NEED_STREAM)

    model: Optional[str] = Field(None, description="served model name; omitted: the served model")
    max_tokens: Optional[Int] = Field(None, description="most tokens to generate", **_doc(minimum=1))
    temperature: Optional[float] = Field(None, description="0 = greedy; default 1", **_doc(minimum=0, maximum=100))
    top_p: Optional[float] = Field(None, **_doc(exclusiveMinimum=0, maximum=1))
    top_k: Optional[Int] = Field(None, description="-1 or 0: off", **_doc(minimum=-1))
    min_p: Optional[float] = Field(None, **_doc(minimum=0, maximum=1))
    n: Optional[Int] = Field(None, description="completions per prompt", **_doc(minimum=1, maximum=128))
    stop: Optional[Union[Annotated[str, Field(min_length=1)], Annotated[list[Annotated[str, Field(min_length=1)]],
                                                                          Field(max_length=16)]]] = None
    stop_token_ids: Optional[list[Annotated[Int, Field(**_doc(minimum=0, **{TOKEN_ID: True}))]]] = None
    seed: Optional[Int] = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = Field(None, description="only with stream: true")
    presence_penalty: Optional[float] = Field(None, **_doc(minimum=-2, maximum=2))
    frequency_penalty: Optional[float] = Field(None, **_doc(minimum=-2, maximum=2))
    repetition_penalty: Optional[float] = Field(None, **_doc(exclusiveMinimum=0, maximum=100))
    ignore_eos: Optional[bool] = False
    min_tokens: Optional[Int] = Field(None, description="at most max_tokens", **_doc(minimum=0))
    include_stop_str_in_output: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    user: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit",
        **_doc(propertyNames={"pattern": TOKEN_ID_KEY},
               additionalProperties={"type": "number", "minimum": -LOGIT_BIAS_MAX, "maximum": LOGIT_BIAS_MAX}))
    response_format: Optional[ResponseFormat] = Field(
        None, description="json_object: the output is a JSON object; json_schema: JSON valid for the schema")
    # Known OpenAI fields this server cannot honour; a value that asks for them is refused.
    best_of: Optional[Int] = Field(None, description="only 1", **_doc(minimum=1, maximum=1))

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key in value or {}:
            if not re.fullmatch(TOKEN_ID_KEY, key):
                raise ValueError(f"keys must be token ids written as decimal integers, got {key!r}")
        return value

    def structured_output(self) -> StructuredOutput | None:
        """What response_format asks the output to be (None: free text)."""
        fmt = self.response_format
        if isinstance(fmt, JSONObjectFormat):
            return StructuredOutput.json()
        if isinstance(fmt, JSONSchemaResponseFormat):
            return StructuredOutput.json(fmt.json_schema.schema_)
        return None

    def check_supported(self) -> None:
        from .errors import APIError

        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        if self.best_of is not None and self.best_of != 1:
            raise APIError(400, "best_of is not supported by this server (only 1)", param="best_of")
        for name, why in self.unsupported_fields():
            raise APIError(400, f"{name} is not supported by this server{why}", param=name)

    def unsupported_fields(self) -> list[tuple[str, str]]:
        return []

    def sampling_params(self, max_tokens: int | None, logprobs: int | None,
                        structured_output: StructuredOutput | None) -> SamplingParams:
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
            skip_special_tokens=pick(self.skip_special_tokens, True),
            logit_bias={int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            structured_output=structured_output)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


TokenId = Annotated[Int, Field(**_doc(minimum=0, **{TOKEN_ID: True}))]
PromptType = Union[Annotated[str, Field(min_length=1)],
                   Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)],
                   Annotated[list[TokenId], Field(min_length=1)],
                   Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]]


class CompletionRequest(SamplingFields):
    model_config = _rules(STREAM_OPTIONS_NEED_STREAM, {  # echo with logprobs: prompt logprobs are not computed
        "if": {"required": ["echo", "logprobs"], "properties": {"echo": {"const": True},
                                                                "logprobs": {"type": "integer"}}}, "then": False})
    prompt: PromptType = Field(..., description="a string, a list of strings, token ids, or a list of token-id lists")
    logprobs: Optional[Int] = Field(None, description="top logprobs per token (0..20); not with echo",
                                    **_doc(minimum=0, maximum=20))
    echo: Optional[bool] = False
    suffix: Optional[str] = Field(None, description="not supported: only empty", **_doc(maxLength=0))

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
        value = [[_whole_number(t) for t in v] if isinstance(v, list) else _whole_number(v) for v in value]
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
    type: Literal["text"]
    text: str


Content = Union[str, list[TextPart]]


class _Message(BaseModel):
    model_config = _CONFIG

    @field_validator("content", mode="before", check_fields=False)
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
        content = getattr(self, "content", None)
        if content is None:
            return ""
        if isinstance(content, str):
            return content
        return "".join(part.text or "" for part in content)


class SystemMessage(_Message):
    role: Literal["system", "developer"]
    content: Content
    name: Optional[str] = None


class UserMessage(_Message):
    role: Literal["user"]
    content: Content
    name: Optional[str] = None


class FunctionCall(BaseModel):
    model_config = _CONFIG
    name: str
    arguments: str = Field(..., description="JSON text of the arguments")


class AssistantToolCall(BaseModel):
    model_config = _CONFIG
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(_Message):
    role: Literal["assistant"]
    content: Optional[Content] = None
    name: Optional[str] = None
    tool_calls: Optional[list[AssistantToolCall]] = None


class ToolMessage(_Message):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


ChatMessage = Annotated[Union[SystemMessage, UserMessage, AssistantMessage, ToolMessage], Discriminator("role")]


class FunctionDefinition(BaseModel):
    model_config = _CONFIG
    name: str = Field(..., pattern=NAME_PATTERN)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = Field(None, description="JSON schema of the arguments object")
    strict: Optional[bool] = None


class Tool(BaseModel):
    model_config = _CONFIG
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(BaseModel):
    model_config = _CONFIG
    name: str


class NamedToolChoice(BaseModel):
    model_config = _CONFIG
    type: Literal["function"]
    function: FunctionName


class ChatCompletionRequest(SamplingFields):
    model_config = _rules(
        STREAM_OPTIONS_NEED_STREAM,
        _when("top_logprobs", {"type": "integer"},
              {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}),
        _when("tool_choice", {"anyOf": [{"const": "auto"}, {"const": "required"}, {"type": "object"}]},
              {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}))
    messages: list[ChatMessage] = Field(..., min_length=1,
                                        description="the conversation (system/developer/user/assistant/tool)")
    max_completion_tokens: Optional[Int] = Field(None, description="alias of max_tokens (wins if both given)",
                                                 **_doc(minimum=1))
    logprobs: Optional[bool] = False
    top_logprobs: Optional[Int] = Field(None, description="alternatives per token (0..20); needs logprobs",
                                        **_doc(minimum=0, maximum=20))
    tools: Optional[list[Tool]] = Field(None, description="functions the model may call")
    tool_choice: Optional[Union[Literal["none", "auto", "required"], NamedToolChoice]] = Field(
        None, description="none: never call; auto (default with tools): the model decides; required: one call; "
                          "a named function: a call to it. Needs tools unless none")
    parallel_tool_calls: Optional[bool] = None
    # Known OpenAI fields that this server cannot honour.
    functions: Optional[list[Any]] = Field(None, description="legacy; use tools", **_doc(maxItems=0))
    function_call: Optional[Union[str, dict[str, Any]]] = Field(None, description="legacy; use tool_choice",
                                                                **_doc(enum=["none", "auto", None]))
    audio: Optional[dict[str, Any]] = Field(None, description="not supported", **_doc(type="null"))
    modalities: Optional[list[str]] = Field(None, description="only text", **_doc(items={"enum": ["text"]}))
    prediction: Optional[dict[str, Any]] = Field(None, description="not supported", **_doc(type="null"))

    def unsupported_fields(self) -> list[tuple[str, str]]:
        out = []
        if self.functions:
            out.append(("functions", " (no function calling)"))
        if self.function_call not in (None, "none", "auto"):
            out.append(("function_call", " (no function calling)"))
        if self.audio is not None:
            out.append(("audio", ""))
        if self.modalities is not None and any(m != "text" for m in self.modalities):
            out.append(("modalities", " (only 'text')"))
        if self.prediction is not None:
            out.append(("prediction", ""))
        if self.top_logprobs is not None and not self.logprobs:
            out.append(("top_logprobs", " without logprobs=true"))
        return out

    def tool_mode(self) -> str:
        """none (no tools in play), auto, required, or named."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        if isinstance(self.tool_choice, NamedToolChoice):
            return "named"
        return self.tool_choice or "auto"

    def functions_offered(self) -> list[dict]:
        return [t.function.model_dump(exclude_none=True) for t in self.tools or []]

    def called_functions(self) -> list[dict]:
        """The functions a required or named tool_choice allows."""
        functions = self.functions_offered()
        if isinstance(self.tool_choice, NamedToolChoice):
            return [f for f in functions if f["name"] == self.tool_choice.function.name]
        return functions

    def conversation(self) -> list[dict[str, Any]]:
        return conversation(self.messages)


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as chat templates want them: developer -> system (templates know system), text content, tool
    calls with their arguments as objects (templates serialise them), tool results with their call id."""
    out = []
    for m in messages:
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if isinstance(m, AssistantMessage) and m.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _arguments_object(c.function.arguments)}}
                for c in m.tool_calls]
        if isinstance(m, ToolMessage):
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, json_schema_extra={"oneOf": [
        {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
        {"required": ["messages"], "properties": {"messages": {"type": "array"}}}]})
    model: Optional[str] = None
    prompt: Optional[str] = Field(None, description="exactly one of prompt and messages")
    messages: Optional[list[ChatMessage]] = Field(None, min_length=1)
    add_special_tokens: Optional[bool] = True


class DetokenizeRequest(BaseModel):
    model_config = _CONFIG
    model: Optional[str] = None
    tokens: list[TokenId]


REQUEST_MODELS = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
}
