"""The offline Python API: LLM(...).generate(prompts, SamplingParams(...)) and .chat(messages, ...)."""

from __future__ import annotations

from typing import Any, Sequence as Seq

from .config import EngineConfig
from .errors import RequestError
from .llm_engine import LLMEngine
from .sampling_params import SamplingParams
from .sequence import RequestOutput


def apply_chat_template(tokenizer, messages: list[dict[str, Any]], tools: list[dict] | None = None) -> list[int]:
    """Token ids of OpenAI-style messages rendered with the model's chat template (generation prompt added);
    tools (OpenAI tool objects) are given to templates that render them."""
    if not messages:
        raise RequestError("messages must not be empty", param="messages")
    if getattr(tokenizer, "chat_template", None) is None:
        # No template: plain role-prefixed text, so base models still get something sensible.
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return tokenizer.encode(text)
    try:
        ids = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True)
    except Exception as e:  # template errors (e.g. roles it refuses) are the caller's problem
        raise RequestError(f"the chat template rejected the messages: {e}", param="messages") from None
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


class LLM:
    def __init__(self, model: str | None = None, attention: str = "dense", device: str = "auto", dtype: str = "auto",
                 max_model_len: int | None = None, **engine_options: Any):
        config = EngineConfig.from_kwargs(model=model, attention=attention, device=device, dtype=dtype,
                                          max_model_len=max_model_len, **engine_options)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_config(cls, config: EngineConfig) -> "LLM":
        llm = cls.__new__(cls)
        llm.engine = LLMEngine(config)
        llm.tokenizer = llm.engine.tokenizer
        return llm

    def _encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    def generate(self, prompts: str | list[int] | Seq[str | list[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion together; one output per prompt, in order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("give one SamplingParams or one per prompt")
        encoded = [self._encode(p) for p in prompts]
        for token_ids, sp in zip(encoded, params_list):  # refuse the batch before anything is queued
            self.engine.validate_request(token_ids, sp)
        return self._run([self.engine.add_request(t, sp, validated=True) for t, sp in zip(encoded, params_list)])

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them) and generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [apply_chat_template(self.tokenizer, conv) for conv in conversations]
        return self.generate(prompts, sampling_params)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        try:
            while len(final) < len(request_ids):
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
        except BaseException:
            for rid in request_ids:
                self.engine.abort(rid)
            raise
        return [final[rid] for rid in request_ids]
