"""Batched token sampling: penalties, temperature, top-k, top-p, min-p, greedy and seeded sampling.

One call handles a whole decode step: ``Sampler()(logits[N, V], rows)`` where ``rows[i]`` describes the
sequence that produced ``logits[i]``. Everything that touches the vocabulary is vectorised over the batch;
the only per-row Python work is building small parameter lists and drawing the random noise of seeded rows
from their own generator (so a seeded row's sample never depends on which other rows share the batch).

Order of operations (as in vLLM):
  1. repetition penalty over prompt + output tokens (positive logits divided, negative ones multiplied),
  2. frequency and presence penalties over output tokens,
  3. min_tokens: EOS and stop_token_ids set to -inf while fewer than min_tokens tokens were produced (not for
     rows under a grammar: the grammar decides when their output ends),
  4. logit_bias added (one scatter for the batch), then the grammar masks of constrained rows (forbidden tokens
     to -inf, one batched call; see structured_output.py),
  5. logprobs = log_softmax of these adjusted logits (see "Logprobs" below),
  6. temperature (temperature == 0: greedy argmax of the adjusted logits, exactly deterministic),
  7. top-k, then top-p over the top-k survivors, then min-p,
  8. sample from softmax of what is left.

Logprobs: reported from the adjusted logits (penalties, logit_bias, grammar) *before* temperature and
truncation. They describe the model's distribution as adjusted by the request (the tokens it may emit), independent
of how sharply it was sampled; this is what OpenAI-style clients expect from ``logprobs`` and it keeps a
greedy request's logprobs equal to a sampled one's. Tokens suppressed by min_tokens or a grammar get -inf.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .sampling_params import SamplingParams
from .structured_output import GrammarState, apply_grammar_masks

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def make_generator(seed: int, index: int = 0, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for sample ``index`` (0..n-1) of a request with ``seed``.

    The seed and index are mixed (splitmix64) rather than added, so seed=1/index=1 and seed=2/index=0 do
    not share a stream. Same (seed, index) -> same stream on a given device."""
    if not isinstance(seed, int) or not isinstance(index, int) or index < 0:
        raise ValueError(f"make_generator needs an integer seed and index >= 0, got seed={seed!r} index={index!r}")
    mixed = _splitmix64(_splitmix64(seed & _MASK64) ^ index) & ((1 << 63) - 1)
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(mixed)
    return generator


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence in the batch."""

    params: SamplingParams
    generator: torch.Generator | None = None  # None: the device's default generator (not reproducible)
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: set[int] = field(default_factory=set)
    # True while fewer than params.min_tokens outputs exist: EOS and stop_token_ids are suppressed.
    # None: derived from len(output_token_ids) < params.min_tokens.
    below_min_tokens: bool | None = None
    # Optional cached LongTensor of prompt ids on the logits' device, so a long prompt is not converted from a
    # Python list on every step when repetition_penalty != 1 (the engine may build it once per sequence).
    prompt_token_tensor: torch.Tensor | None = None
    grammar: GrammarState | None = None  # the sequence's grammar state when its output is constrained

    @property
    def suppress_stop_tokens(self) -> bool:
        if self.grammar is not None:
            return False
        if self.below_min_tokens is not None:
            return self.below_min_tokens
        return len(self.output_token_ids) < self.params.min_tokens

    def stop_token_ids_to_suppress(self) -> set[int]:
        """EOS (unless ignore_eos, where EOS is an ordinary token) and stop_token_ids."""
        ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            ids |= set(self.eos_token_ids)
        return ids


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float]  # logprob of each row's sampled token
    top_logprobs: list[list[tuple[int, float]]]  # params.logprobs best (token, logprob) per row, best first


class Sampler:
    """One instance serves every step. `generator` (on the logits' device) draws for the rows that have no
    generator of their own (requests without a seed); None: the device's default generator."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
        if logits.dim() != 2:
            raise ValueError(f"Sampler expects logits of shape [N, V], got {tuple(logits.shape)}")
        if logits.shape[0] != len(rows):
            raise ValueError(f"Sampler got {logits.shape[0]} logit rows but {len(rows)} sampling rows")
        if not rows:
            return SampleResult([], [], [])
        # Work on a float32 copy: penalties write in place and the caller's tensor must stay intact.
        logits = logits.to(dtype=torch.float32, copy=True)

        self._apply_penalties(logits, rows)
        self._suppress_stop_tokens(logits, rows)
        self._apply_logit_bias(logits, rows)
        apply_grammar_masks(logits, [(i, row.grammar) for i, row in enumerate(rows) if row.grammar is not None])
        logprobs = torch.log_softmax(logits, dim=-1)

        tokens = logits.argmax(dim=-1)  # greedy rows keep this (first maximum on ties: deterministic)
        random_rows = [i for i, row in enumerate(rows) if row.params.temperature != 0.0]
        if random_rows:
            if len(random_rows) == len(rows):
                tokens = self._sample(logits, rows)
            else:
                index = torch.tensor(random_rows, device=logits.device)
                sampled = self._sample(logits.index_select(0, index), [rows[i] for i in random_rows])
                tokens.index_copy_(0, index, sampled)

        token_logprobs = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        top = self._top_logprobs(logprobs, rows)
        return SampleResult(token_ids=tokens.tolist(), logprobs=token_logprobs.tolist(), top_logprobs=top)

    # ----- penalties -----------------------------------------------------------------------------------

    @staticmethod
    def _padded_ids(id_seqs: list, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[R, L] LongTensor on device of the id lists/tensors, padded with vocab_size (a scratch column past the
        vocabulary). Ids outside [0, vocab_size) (tokenizer entries the model head lacks) also go there.

        Python lists are padded on the CPU and copied once; tensors (cached prompts) are padded where they are."""
        if any(isinstance(s, torch.Tensor) for s in id_seqs):
            where = device
            tensors = [s.to(device=device, dtype=torch.long).reshape(-1) if isinstance(s, torch.Tensor)
                       else torch.as_tensor(s, dtype=torch.long, device=device) for s in id_seqs]
        else:
            where = torch.device("cpu")
            tensors = [torch.as_tensor(s, dtype=torch.long) for s in id_seqs]
        if all(t.numel() == 0 for t in tensors):
            return torch.full((len(tensors), 1), vocab_size, dtype=torch.long, device=device)
        padded = torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=vocab_size)
        padded = torch.where((padded >= 0) & (padded < vocab_size), padded, vocab_size)
        return padded if where == device else padded.to(device)

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        vocab_size = logits.shape[1]
        device = logits.device

        rep_rows = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep_rows:
            seen = torch.zeros(len(rep_rows), vocab_size + 1, dtype=torch.bool, device=device)
            prompts = [rows[i].prompt_token_tensor if rows[i].prompt_token_tensor is not None
                       else rows[i].prompt_token_ids for i in rep_rows]
            outputs = [rows[i].output_token_ids for i in rep_rows]
            for id_seqs in (prompts, outputs):
                seen.scatter_(1, self._padded_ids(id_seqs, vocab_size, device), True)
            seen = seen[:, :vocab_size]
            penalty = torch.tensor([rows[i].params.repetition_penalty for i in rep_rows], device=device).unsqueeze(1)
            index = torch.tensor(rep_rows, device=device)
            sub = logits.index_select(0, index)
            penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
            logits.index_copy_(0, index, torch.where(seen, penalised, sub))

        count_rows = [i for i, r in enumerate(rows) if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0]
        if count_rows:
            ids = self._padded_ids([rows[i].output_token_ids for i in count_rows], vocab_size, device)
            counts = torch.zeros(len(count_rows), vocab_size + 1, dtype=torch.float32, device=device)
            counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.float32))
            counts = counts[:, :vocab_size]
            frequency = torch.tensor([rows[i].params.frequency_penalty for i in count_rows], device=device).unsqueeze(1)
            presence = torch.tensor([rows[i].params.presence_penalty for i in count_rows], device=device).unsqueeze(1)
            index = torch.tensor(count_rows, device=device)
            sub = logits.index_select(0, index)
            sub = sub - frequency * counts - presence * (counts > 0).to(torch.float32)
            logits.index_copy_(0, index, sub)

    @staticmethod
    def _suppress_stop_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        vocab_size = logits.shape[1]
        row_index: list[int] = []
        token_index: list[int] = []
        for i, row in enumerate(rows):
            if row.suppress_stop_tokens:
                for token in row.stop_token_ids_to_suppress():
                    if 0 <= token < vocab_size:
                        row_index.append(i)
                        token_index.append(token)
        if row_index:
            device = logits.device
            logits[torch.tensor(row_index, device=device), torch.tensor(token_index, device=device)] = float("-inf")

    @staticmethod
    def _apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        biased = [i for i, row in enumerate(rows) if row.params.logit_bias]
        if not biased:
            return
        tokens, biases, row_index = [], [], []
        for i in biased:
            ids, values = rows[i].params.logit_bias_tensors
            tokens.append(ids)
            biases.append(values)
            row_index.append(torch.full_like(ids, i))
        tokens, biases, row_index = torch.cat(tokens), torch.cat(biases), torch.cat(row_index)
        inside = tokens < logits.shape[1]  # ids the model head lacks (checked by the engine) are ignored here
        device = logits.device
        logits.index_put_((row_index[inside].to(device), tokens[inside].to(device)), biases[inside].to(device),
                          accumulate=True)

    # ----- sampling ------------------------------------------------------------------------------------

    def _sample(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """Token per row drawn from the temperature-scaled, truncated distribution (all rows have temperature > 0)."""
        vocab_size = logits.shape[1]
        device = logits.device
        temperature = torch.tensor([r.params.temperature for r in rows], device=device)
        scaled = logits / temperature.unsqueeze(1)

        top_k = [r.params.top_k if 0 < r.params.top_k < vocab_size else vocab_size for r in rows]
        top_p = [r.params.top_p for r in rows]
        truncated = [i for i in range(len(rows)) if top_k[i] < vocab_size or top_p[i] < 1.0]
        if truncated:
            index = torch.tensor(truncated, device=device)
            cut = self._apply_top_k_top_p(scaled.index_select(0, index), [top_k[i] for i in truncated],
                                          [top_p[i] for i in truncated])
            scaled.index_copy_(0, index, cut)

        min_p = [r.params.min_p for r in rows]
        if any(p > 0.0 for p in min_p):
            probs = torch.softmax(scaled, dim=-1)
            threshold = probs.amax(dim=-1, keepdim=True) * torch.tensor(min_p, device=device).unsqueeze(1)
            scaled = scaled.masked_fill(probs < threshold, float("-inf"))

        probs = torch.softmax(scaled, dim=-1)
        return self._exponential_race(probs, rows)

    @staticmethod
    def _apply_top_k_top_p(scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
        """-inf outside each row's top-k, then outside the smallest prefix of the rest whose mass reaches top_p.

        Only the best max(top_k) candidates of each row are ranked (torch.topk) when every row has a top-k: top-p
        applies after top-k, so nothing beyond them can survive. A full sort is needed only for top-p alone."""
        device = scaled.device
        vocab_size = scaled.shape[1]
        candidates = max(top_k)  # == vocab_size when some row has no top-k
        if candidates < vocab_size:
            sorted_logits, order = scaled.topk(candidates, dim=-1, sorted=True)
        else:
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(candidates, device=device).unsqueeze(0)
        drop = rank >= torch.tensor(top_k, device=device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))

        p = torch.tensor(top_p, device=device).unsqueeze(1)
        sorted_probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        # Keep the smallest prefix whose mass reaches p: drop a token once the mass before it is >= p. Rows with
        # p == 1 are left alone (rounding could push mass_before to 1.0 and cut real tokens), and the best
        # token always stays.
        drop_p = (mass_before >= p) & (p < 1.0) & (rank > 0)
        sorted_logits = sorted_logits.masked_fill(drop_p, float("-inf"))
        return torch.full_like(scaled, float("-inf")).scatter(1, order, sorted_logits)

    def _exponential_race(self, probs: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        """argmax(probs / E) with E ~ Exp(1) i.i.d. picks token i with probability probs[i] (Gumbel-max trick
        in another form). Seeded rows draw E from their own generator; the rest share one draw from the
        sampler's generator."""
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.generator is None]
        if unseeded:
            if len(unseeded) == len(rows):
                noise.exponential_(generator=self.generator)
            else:
                index = torch.tensor(unseeded, device=probs.device)
                draw = torch.empty(len(unseeded), probs.shape[1], device=probs.device)
                noise.index_copy_(0, index, draw.exponential_(generator=self.generator))
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        # exponential_ may return exactly 0; a tiny floor keeps masked tokens at 0 / tiny = 0 instead of NaN.
        noise.clamp_(min=1e-30)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _top_logprobs(logprobs: torch.Tensor, rows: list[SamplingRow]) -> list[list[tuple[int, float]]]:
        wanted = [min(r.params.logprobs or 0, logprobs.shape[1]) for r in rows]
        result: list[list[tuple[int, float]]] = [[] for _ in rows]
        k_max = max(wanted)
        if k_max == 0:
            return result
        values, indices = logprobs.topk(k_max, dim=-1)
        values, indices = values.tolist(), indices.tolist()
        for i, k in enumerate(wanted):
            result[i] = list(zip(indices[i][:k], values[i][:k]))
        return result
