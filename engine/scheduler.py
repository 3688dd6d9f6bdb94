"""Continuous batching with chunked prefill under a per-step token budget, and preemption by recompute.

Each step: running sequences first (decode tokens cost 1, unfinished prefills take a chunk), then waiting
sequences are admitted while budget, sequence slots and KV blocks allow. A 1M-token prompt is therefore
prefilled a chunk per step while the other requests keep decoding. When blocks run out, the most recently
admitted running sequence is preempted: its blocks are freed and it is recomputed later (its generated
tokens are kept and recomputed as part of its prompt).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from .block_manager import BlockManager
from .sequence import Sequence, SeqStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed for it this step

    @property
    def samples(self) -> bool:
        """True when this chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq.token_ids)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.on_preempt = lambda seq: None  # the engine drops backend state of a preempted sequence

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and return its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free_sequence(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free_sequence(seq)
        self.on_preempt(seq)
        seq.status = SeqStatus.WAITING
        seq.request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSeq] = []
        # 1. Running sequences, oldest first; preempt from the newest end when blocks run out.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_uncomputed_tokens, budget)
            while not self.blocks.can_allocate(self.blocks.blocks_needed(seq, n)):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status != SeqStatus.RUNNING:
                break  # seq preempted itself: nothing older can be freed
            self.blocks.allocate(seq, n)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
            i += 1
        # 2. Admit waiting sequences (FIFO) while budget, slots and blocks allow.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            lookup = self.blocks.match_prefix(seq) if not seq.block_table else (0, 0)
            n = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_allocate(self.blocks.blocks_needed(seq, n)):
                if not self.running and not scheduled:
                    # Nothing else holds blocks: admit a smaller chunk that fits, so progress is guaranteed.
                    n = min(n, (self.blocks.num_free_blocks + len(seq.block_table)) * self.blocks.block_size
                            - seq.num_computed_tokens)
                if n <= 0 or not self.blocks.can_allocate(self.blocks.blocks_needed(seq, n)):
                    self.blocks.free_sequence(seq)  # waiting sequences hold no blocks (only prefix hits)
                    break
            self.waiting.popleft()
            self.blocks.count_prefix_lookup(*lookup)  # once per admission, not once per step spent waiting
            self.blocks.allocate(seq, n)
            seq.status = SeqStatus.RUNNING
            if seq.request.metrics.first_scheduled_time is None:
                seq.request.metrics.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            scheduled.append(ScheduledSeq(seq, n))
            budget -= n
        return scheduled
