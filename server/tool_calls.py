"""Tool calling: the call format a model family was trained on, parsed out of its output, and the grammar that
forces a valid call when the request requires one.

Two formats, named as vLLM's ``--tool-call-parser`` values:
  hermes       Qwen2.5 / Qwen3 (and other ChatML models):
               ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block per call, optional
               text before the first block.
  llama3_json  Llama 3.1+: the whole answer is ``{"name": ..., "parameters": {...}}`` (several separated by ";"),
               optionally after the ``<|python_tag|>`` token.
``parser_for_checkpoint`` picks one from the checkpoint's chat template.

A chat template that knows tools (it reads ``tools``) renders them itself; for one that does not, the tools are
described in a system message in the parser's format (``tools_system_prompt``), and earlier calls in the
conversation are written back as the model would have produced them.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from ..engine.structured_output import StructuredOutput


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of the arguments object
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def _arguments_schema(function: dict) -> dict:
    return function.get("parameters") or {"type": "object", "properties": {}}


class ToolParser:
    name = ""
    arguments_key = "arguments"
    prefix = ""  # text before each call's JSON
    suffix = ""  # text after it

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a complete output; no calls (and the text as content) if it holds none."""
        raise NotImplementedError

    def held_from(self, text: str) -> int:
        """While streaming: the index where a call may be starting, so text from there on is held back until
        the output ends (len(text) when all of it is plain content)."""
        raise NotImplementedError

    def call_grammar(self, functions: list[dict]) -> StructuredOutput:
        """One call to any of functions (each an OpenAI function object), its arguments valid for its schema."""
        alternatives = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                          self.arguments_key: _arguments_schema(f)},
                         "required": ["name", self.arguments_key], "additionalProperties": False}
                        for f in functions]
        schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
        return StructuredOutput.json(schema, prefix=self.prefix, suffix=self.suffix)

    def format_call(self, name: str, arguments: dict) -> str:
        """A call written as the model writes it (for conversations whose template cannot render tool calls)."""
        body = json.dumps({"name": name, self.arguments_key: arguments}, ensure_ascii=False)
        return f"{self.prefix}{body}{self.suffix}"

    def tools_system_prompt(self, functions: list[dict]) -> str:
        raise NotImplementedError

    def _call_from(self, obj) -> ToolCall | None:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get(self.arguments_key, obj.get("arguments", obj.get("parameters", {})))
        if not isinstance(args, dict):
            return None
        return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesParser(ToolParser):
    name = "hermes"
    prefix = "<tool_call>\n"
    suffix = "\n</tool_call>"
    START, END = "<tool_call>", "</tool_call>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.START)
        if start < 0:
            return text, []
        calls, rest = [], text[start:]
        while rest.startswith(self.START):
            end = rest.find(self.END)
            body = rest[len(self.START): end if end >= 0 else len(rest)]
            try:
                call = self._call_from(json.loads(body))
            except ValueError:
                call = None
            if call is None:
                return text, []  # a malformed block: the output is shown as it is
            calls.append(call)
            rest = rest[end + len(self.END):].lstrip() if end >= 0 else ""
        content = text[:start].strip() + (rest and "\n" + rest)
        return content.strip() or None, calls

    def held_from(self, text: str) -> int:
        start = text.find(self.START)
        if start >= 0:
            return start
        for keep in range(min(len(self.START) - 1, len(text)), 0, -1):  # a marker cut between two chunks
            if self.START.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)

    def tools_system_prompt(self, functions: list[dict]) -> str:
        listed = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
        return ("# Tools\n\nYou may call one or more functions to assist with the user query. The functions "
                f"you may call are listed within <tools></tools> XML tags:\n<tools>\n{listed}\n</tools>\n\n"
                "For each call, return a JSON object with the function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


class Llama3JsonParser(ToolParser):
    name = "llama3_json"
    arguments_key = "parameters"
    PYTHON_TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        body = body[len(self.PYTHON_TAG):].lstrip() if body.startswith(self.PYTHON_TAG) else body
        if not body.startswith("{"):
            return text, []
        decoder, calls, pos = json.JSONDecoder(), [], 0
        while pos < len(body):
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except ValueError:
                return text, []
            call = self._call_from(obj)
            if call is None:
                return text, []
            calls.append(call)
            while pos < len(body) and body[pos] in " \t\r\n;":
                pos += 1
        return None, calls

    def held_from(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{") or body.startswith(self.PYTHON_TAG) or self.PYTHON_TAG.startswith(body):
            return 0
        return len(text)

    def tools_system_prompt(self, functions: list[dict]) -> str:
        listed = "\n\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
        return ("You have access to the following functions. To call a function, respond only with JSON of the "
                'form {"name": function name, "parameters": dictionary of argument name and its value}. '
                f"Do not use variables.\n\n{listed}")


PARSERS = {p.name: p for p in (HermesParser(), Llama3JsonParser())}


def parser_for_checkpoint(chat_template: str | None) -> ToolParser:
    """The format the checkpoint's chat template writes tool calls in: Llama 3 templates (header tokens,
    ipython, python_tag) use llama3_json; Qwen's and other ChatML templates, and any other, hermes."""
    template = chat_template or ""
    if "<tool_call>" in template:
        return PARSERS["hermes"]
    if any(mark in template for mark in ("<|python_tag|>", "ipython", "<|start_header_id|>")):
        return PARSERS["llama3_json"]
    return PARSERS["hermes"]
