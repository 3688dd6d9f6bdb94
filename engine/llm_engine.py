"""The synchronous engine: requests in, one scheduler step at a time, outputs out.

LLM (offline API) and AsyncEngine (the server's) both drive this class; nothing here knows about HTTP.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..kernels.base import BackendError, BackendSetup
from ..kernels.plan import AttentionPlan
from ..kernels.registry import build_backend
from .block_manager import BlockManager
from .config import EngineConfig
from .detokenizer import IncrementalDetokenizer
from .errors import EngineError, RequestError, StepError
from .loader import load_model
from .model_runner import ModelRunner
from .sampler import Sampler, SamplingRow, make_generator
from .sampling_params import SamplingParams
from .scheduler import Scheduler
from .sequence import CompletionOutput, Request, RequestOutput, Sequence, SeqStatus
from .structured_output import GrammarCache


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise EngineError(f"unknown device {device!r} (expected auto, cpu or cuda[:N])") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineError("device 'cuda' was requested but no CUDA GPU is available")
    return dev


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_kv_blocks: int
    num_free_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int


class LLMEngine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.device = resolve_device(config.device)
        loaded = load_model(config.model, self.device, config.dtype)  # 'auto': loader.resolve_dtype's rule
        self.dtype = loaded.dtype
        self.model_path = loaded.path
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model_name = config.model or "smollm2-135m-instruct"
        block_size = config.block_size or (64 if self.device.type == "cuda" else 16)
        self.backend = self._build_backend(block_size)
        self.runner = ModelRunner(loaded.model, loaded.config, self.backend, self.device, self.dtype, block_size,
                                  config.num_kv_blocks, config.kv_cache_memory_gb, config.gpu_memory_utilization)
        self.block_manager = BlockManager(self.runner.num_kv_blocks, block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        self.scheduler.on_preempt = self._on_preempt
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.kv_capacity_tokens = self.runner.num_kv_blocks * block_size
        # Requests without a seed of their own draw from one generator seeded with --seed: a run of the same
        # requests in the same order samples the same tokens.
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(config.seed))
        self.eos_token_ids = set(self.model_config.eos_token_ids or [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        self.grammars = GrammarCache(self.tokenizer, self.model_config.vocab_size, sorted(self.eos_token_ids))
        self.requests: dict[str, Request] = {}
        self._ids = itertools.count()

    def _build_backend(self, block_size: int):
        """The attention backend, checked against the model, block size, dtype and device: a setting it cannot
        serve fails here, at start-up, not in the first step."""
        c, m = self.config, self.model_config
        try:
            if c.policy:
                plan = AttentionPlan.load(c.policy)
                plan.check_model(m.model_info())
                backend = build_backend(plan=plan, params=c.attention_config, impl=c.attention_impl)
            else:
                backend = build_backend(c.attention, m.num_layers, c.attention_config, impl=c.attention_impl)
            backend.check(BackendSetup(m.num_heads, m.num_kv_heads, m.head_dim, block_size, self.dtype, self.device))
        except BackendError as e:
            raise EngineError(str(e)) from None
        return backend

    # -- requests -------------------------------------------------------------------------------------------
    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise RequestError for a request that can never run; nothing is allocated.

        The one check of a request: callers that ran it (LLM.generate, the server) pass validated=True to
        add_request / AsyncEngine.generate so a 1M-token prompt is not checked again."""
        n = len(prompt_token_ids)
        if n == 0:
            raise RequestError("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        ids = np.asarray(prompt_token_ids)  # one vectorised range check instead of a Python loop per token
        if ids.ndim != 1 or ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= vocab:
            raise RequestError(f"prompt token ids must be integers in [0, {vocab})", param="prompt")
        if n >= self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt has "
                f"{n} tokens, leaving no room for the completion.", param="prompt", code="context_length_exceeded")
        if params.max_tokens is not None and n + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n + params.max_tokens} tokens ({n} in the prompt, {params.max_tokens} for the completion). "
                "Please reduce the prompt or max_tokens.", param="max_tokens", code="context_length_exceeded")
        total = n + (params.max_tokens or self.max_model_len - n)
        if total > self.kv_capacity_tokens:
            raise RequestError(
                f"the request needs up to {total} tokens of KV cache but the cache holds {self.kv_capacity_tokens} "
                "tokens (raise --num-kv-blocks / --kv-cache-memory-gb, or lower max_tokens)",
                param="max_tokens", code="context_length_exceeded")
        if params.stop_token_ids and max(params.stop_token_ids) >= vocab:
            raise RequestError(f"stop_token_ids must be below the vocabulary size {vocab}", param="stop_token_ids")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise RequestError(f"logit_bias keys must be token ids below the vocabulary size {vocab}",
                               param="logit_bias")
        if params.structured_output is not None:
            self.grammars.compile(params.structured_output)  # cached: add_request finds it compiled

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None,
                    validated: bool = False) -> str:
        """Queue a request. validated=True: the caller ran validate_request on these arguments already."""
        if not validated:
            self.validate_request(prompt_token_ids, params)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        request = Request(request_id, prompt_token_ids, params)
        if params.repetition_penalty != 1.0:
            request.prompt_token_tensor = torch.tensor(prompt_token_ids, dtype=torch.long, device=self.device)
        for seq in request.seqs:
            seq.generator = make_generator(params.seed, seq.index, self.device) if params.seed is not None else None
            if self.tokenizer is not None:
                seq.detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params)
            if params.structured_output is not None:
                seq.grammar = self.grammars.matcher(params.structured_output)
            self.scheduler.add(seq)
        self.requests[request_id] = request
        return request_id

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request wherever it is; its blocks and backend state are returned at once."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort")
        return self._output(request)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), bm.usage, bm.num_blocks,
                           bm.num_free_blocks, bm.prefix_queries, bm.prefix_hits, self.scheduler.num_preemptions)

    # -- stepping -------------------------------------------------------------------------------------------
    def _on_preempt(self, seq: Sequence) -> None:
        self.backend.free_sequence(seq.seq_id)

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        self.scheduler.remove(seq)
        self.backend.free_sequence(seq.seq_id)
        seq.status = SeqStatus.FINISHED
        if seq.detokenizer is not None:
            seq.detokenizer.finish()
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return outputs of the requests that produced tokens or finished.

        A step that raises fails only its own requests: they are aborted (blocks and backend state returned)
        and StepError names them; the engine stays usable for the others."""
        scheduled = self.scheduler.schedule()
        if not scheduled:
            return []
        try:
            return self._run_step(scheduled)
        except Exception as e:
            request_ids = list(dict.fromkeys(item.seq.request.request_id for item in scheduled))
            for request_id in request_ids:
                self.abort(request_id)
            raise StepError(f"internal error in an engine step: {type(e).__name__}: {e}", request_ids) from e

    def _run_step(self, scheduled: list) -> list[RequestOutput]:
        logits = self.runner.execute(scheduled)
        now = time.monotonic()
        sampled = [s for s in scheduled if s.samples]
        for item in scheduled:
            item.seq.num_computed_tokens += item.num_tokens
            self.block_manager.register_full_blocks(item.seq)
        touched: dict[str, Request] = {}
        if sampled:
            rows = [SamplingRow(params=s.seq.request.params, generator=s.seq.generator,
                                prompt_token_ids=s.seq.request.prompt_token_ids,
                                prompt_token_tensor=s.seq.request.prompt_token_tensor,
                                output_token_ids=s.seq.output_token_ids, eos_token_ids=self.eos_token_ids,
                                grammar=s.seq.grammar)
                    for s in sampled]
            result = self.sampler(logits, rows)
            for j, item in enumerate(sampled):
                seq = item.seq
                self._append_token(seq, result.token_ids[j], result.logprobs[j], result.top_logprobs[j], now)
                touched[seq.request.request_id] = seq.request
        outputs = []
        for request in touched.values():
            outputs.append(self._output(request))
            if request.is_finished:
                request.metrics.finished_time = now
                self.requests.pop(request.request_id, None)
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: float, top: list, now: float) -> None:
        params = seq.request.params
        seq.token_ids.append(token)
        seq.logprobs.append(logprob)
        seq.top_logprobs.append(top)
        metrics = seq.request.metrics
        if metrics.first_token_time is None:
            metrics.first_token_time = now
        metrics.last_token_time = now
        n_out = seq.num_output_tokens
        if seq.grammar is not None and (not seq.grammar.accept(token) or seq.grammar.is_terminated):
            # The grammar ended with its stop token (its text is never shown), also under ignore_eos.
            return self._finish(seq, "stop", token if token in params.stop_token_ids else None)
        if n_out >= params.min_tokens:
            # A stop token ends the output without its own text appearing in it.
            if not params.ignore_eos and token in self.eos_token_ids:
                return self._finish(seq, "stop", token if token in params.stop_token_ids else None)
            if token in params.stop_token_ids:
                return self._finish(seq, "stop", token)
        if seq.detokenizer is not None:
            seq.detokenizer.append(token)
            if seq.detokenizer.stopped_by is not None:
                return self._finish(seq, "stop", seq.detokenizer.stopped_by)
        if params.max_tokens is not None and n_out >= params.max_tokens:
            return self._finish(seq, "length")
        if len(seq.token_ids) >= self.max_model_len:
            return self._finish(seq, "length")

    def _output(self, request: Request) -> RequestOutput:
        outs = []
        for seq in request.seqs:
            token_ids = seq.output_token_ids
            text = seq.detokenizer.emittable_text if seq.detokenizer is not None else ""
            want_logprobs = request.params.logprobs is not None
            outs.append(CompletionOutput(seq.index, text, list(token_ids), seq.finish_reason, seq.stop_reason,
                                         list(seq.logprobs) if want_logprobs else None,
                                         list(seq.top_logprobs) if want_logprobs else None))
        cached = max((s.num_cached_tokens for s in request.seqs), default=0)
        return RequestOutput(request.request_id, request.prompt_token_ids, outs, request.is_finished, cached,
                             request.metrics)
