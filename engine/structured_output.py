"""Structured outputs: generation constrained by a grammar (xgrammar), e.g. JSON that matches a schema.

A request's SamplingParams carries a StructuredOutput: literal prefix text, then one JSON value matching a JSON
schema, then literal suffix text, then a stop token (EOS). The engine compiles each distinct StructuredOutput
once (``GrammarCache``, keyed by the value), gives every sequence its own matcher, advances the matcher with
each sampled token, and the sampler masks the logits of every constrained row of a step in one batched call
(``apply_grammar_masks``).

JSON is generated compactly (no free whitespace: a model cannot pad an answer with endless blanks), with ", "
and ": " separators, properties in the schema's order.

xgrammar needs the tokenizer's vocabulary as the model sees it: the token strings, and the model's vocabulary
size, which can exceed the tokenizer's (padded embedding rows are never allowed by a grammar). Importing this
module loads nothing; xgrammar is imported on first use.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import RequestError

if TYPE_CHECKING:  # torch is imported by what runs the model, not by `longserve --help`
    import torch

ANY_JSON_OBJECT = '{"type": "object"}'
CACHE_SIZE = 256  # compiled grammars kept (least recently used dropped first)


@dataclass(frozen=True)
class StructuredOutput:
    """What a constrained output must be: ``prefix`` + JSON matching ``json_schema`` + ``suffix``.

    json_schema is JSON text; ``StructuredOutput.json(schema)`` builds one from a dict (None: any JSON object)."""

    json_schema: str = ANY_JSON_OBJECT
    prefix: str = ""
    suffix: str = ""

    @classmethod
    def json(cls, schema: dict | None = None, prefix: str = "", suffix: str = "") -> "StructuredOutput":
        text = ANY_JSON_OBJECT if schema is None else json.dumps(schema, sort_keys=False, ensure_ascii=False)
        return cls(text, prefix, suffix)


_XGRAMMAR_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+?:\d+: ")


def _library_message(error: Exception) -> str:
    """xgrammar's message without its '[time] file.cc:line: ' prefix; the first line only."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return _XGRAMMAR_LOG_PREFIX.sub("", text)


def _length_bounded_strings_as_patterns(schema: Any) -> Any:
    """The schema with each string subschema bounded by minLength/maxLength (and no pattern, format, enum or
    const) given the equivalent pattern of non-control characters.

    xgrammar 0.2 generates such strings from a character class that lets raw control characters through, which
    strict JSON parsers refuse; its pattern path escapes them properly."""
    if isinstance(schema, list):
        return [_length_bounded_strings_as_patterns(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _length_bounded_strings_as_patterns(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if bounded and out.get("type") == "string" and not {"pattern", "format", "enum", "const"} & out.keys():
        low, high = out.get("minLength", 0), out.get("maxLength", "")
        if isinstance(low, int) and (high == "" or isinstance(high, int)):
            out["pattern"] = f"^[^\\x00-\\x1f]{{{low},{high}}}$"  # the lengths move into the pattern
            out.pop("minLength", None)
            out.pop("maxLength", None)
    return out


def _import_xgrammar():
    try:
        import xgrammar
    except ImportError:
        raise RequestError("structured outputs need the xgrammar package (pip install 'longserve[server]')",
                           param="response_format") from None
    return xgrammar


class GrammarCache:
    """Compiles StructuredOutputs for one tokenizer and model vocabulary; each distinct value once.

    Safe to use from several threads (the server validates requests on its own thread, the engine thread builds
    matchers): the cache is guarded by a lock, compilation runs outside it."""

    def __init__(self, tokenizer, model_vocab_size: int, stop_token_ids: list[int], max_threads: int = 1):
        self.tokenizer = tokenizer
        self.model_vocab_size = model_vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_threads = max_threads
        self._compiler = None
        self._vocab_size = 0  # the grammar's vocabulary: max(model, tokenizer), known once the compiler exists
        self._lock = threading.Lock()
        self._compiled: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self.compilations = 0  # how many times a grammar was actually compiled (the cache's misses)

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                xgr = _import_xgrammar()
                if self.tokenizer is None:
                    raise RequestError("structured outputs need the model's tokenizer", param="response_format")
                self._vocab_size = max(self.model_vocab_size, len(self.tokenizer))
                info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self._vocab_size,
                                                          stop_token_ids=self.stop_token_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=self.max_threads)
            return self._compiler

    def compile(self, spec: StructuredOutput):
        """The compiled grammar of spec; RequestError (param response_format) naming the problem if the
        library cannot compile it."""
        with self._lock:
            if spec in self._compiled:
                self._compiled.move_to_end(spec)
                return self._compiled[spec]
        compiler = self._get_compiler()
        xgr = _import_xgrammar()
        try:
            schema = json.loads(spec.json_schema)
        except ValueError as e:
            raise RequestError(f"the JSON schema is not valid JSON: {e}", param="response_format") from None
        try:
            schema_text = json.dumps(_length_bounded_strings_as_patterns(schema))
            grammar = xgr.Grammar.from_json_schema(schema_text, any_whitespace=False)
            parts = [xgr.Grammar.from_ebnf(f"root ::= {json.dumps(text)}") if text else None
                     for text in (spec.prefix, spec.suffix)]
            if any(parts):
                grammar = xgr.Grammar.concat(*[g for g in (parts[0], grammar, parts[1]) if g is not None])
            compiled = compiler.compile_grammar(grammar)
        except Exception as e:  # xgrammar raises RuntimeError/ValueError/its own types for a bad schema
            raise RequestError(f"the JSON schema cannot be used: {_library_message(e)}",
                               param="response_format") from None
        with self._lock:
            self.compilations += 1
            self._compiled[spec] = compiled
            while len(self._compiled) > CACHE_SIZE:
                self._compiled.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutput) -> "GrammarState":
        """A fresh state (one sequence's position in the grammar) at the start of spec's grammar."""
        compiled = self.compile(spec)
        return GrammarState(_import_xgrammar().GrammarMatcher(compiled), self._vocab_size)


class GrammarState:
    """One sequence's position in its grammar."""

    def __init__(self, matcher, bitmask_vocab_size: int):
        self.matcher = matcher
        self.bitmask_vocab_size = bitmask_vocab_size

    def accept(self, token: int) -> bool:
        """Advance by token; False if the grammar does not allow it (the state is then unchanged)."""
        return bool(self.matcher.accept_token(token))

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and its stop token was accepted: nothing may follow."""
        return bool(self.matcher.is_terminated())


def apply_grammar_masks(logits: torch.Tensor, states: list[tuple[int, GrammarState]]) -> None:
    """Set to -inf, in place, every token the grammar forbids next, for the rows (row index, state) given.

    Each state fills its row of one bitmask; one call then masks all constrained rows of logits [N, V]."""
    if not states:
        return
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(logits.shape[0], states[0][1].bitmask_vocab_size)
    for row, state in states:
        state.matcher.fill_next_token_bitmask(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[1],
                                    indices=[row for row, _ in states])
