"""Paged KV-cache block manager: free list, reference counts, prefix caching by chained block hashes.

A full block is identified by the hash of its tokens chained with the hash of everything before it, so two
sequences with the same prefix map that prefix to the same physical blocks. A block whose reference count
drops to zero keeps its hash and its contents until the block is handed out again (least recently freed
first), so a later request with the same prefix still hits it.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from .sequence import Sequence


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(len(tokens).to_bytes(4, "little"))
    for t in tokens:
        h.update(t.to_bytes(4, "little", signed=False))
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block id holding those tokens
        # Free blocks in the order they should be reused (oldest freed first); an OrderedDict so a cached
        # free block can be taken out of the middle in O(1) when a prefix hit revives it.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.prefix_queries = 0  # prompt blocks looked up by admitted sequences
        self.prefix_hits = 0  # of those, found in the cache

    # -- capacity ---------------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self.free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        total = seq.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    # -- allocation -------------------------------------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self.free.popitem(last=False)
        old = self.block_hashes[block]
        if old is not None and self.cached.get(old) == block:
            del self.cached[old]
        self.block_hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def match_prefix(self, seq: Sequence) -> tuple[int, int]:
        """Before a sequence's first chunk: map its leading full prompt blocks to cached blocks.

        At most (len - 1) // block_size blocks, so at least one token is always computed (its logits are
        needed to sample). Returns (blocks looked up, blocks found): the scheduler counts them with
        count_prefix_lookup once the sequence is admitted, so a sequence that waits for free blocks through
        many steps (matched and released each time) is counted once."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return 0, 0
        parent = b""
        looked_up = 0
        max_blocks = (len(seq.token_ids) - 1) // self.block_size
        for i in range(max_blocks):
            tokens = seq.token_ids[i * self.block_size:(i + 1) * self.block_size]
            h = block_hash(parent, tokens)
            looked_up += 1
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.free[block]
            self.ref_counts[block] += 1
            seq.block_table.append(block)
            parent = h
        seq.num_hashed_blocks = len(seq.block_table)
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        return looked_up, len(seq.block_table)

    def count_prefix_lookup(self, looked_up: int, found: int) -> None:
        self.prefix_queries += looked_up
        self.prefix_hits += found

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Extend the block table so that num_computed_tokens + num_new_tokens tokens have slots."""
        need = self.blocks_needed(seq, num_new_tokens)
        if need > len(self.free):
            raise RuntimeError("allocate() without can_allocate(): scheduler bug")
        for _ in range(need):
            seq.block_table.append(self._take_free())

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: publish newly completed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        parent = self.block_hashes[seq.block_table[seq.num_hashed_blocks - 1]] if seq.num_hashed_blocks else b""
        for i in range(seq.num_hashed_blocks, full):
            block = seq.block_table[i]
            h = block_hash(parent or b"", seq.token_ids[i * self.block_size:(i + 1) * self.block_size])
            self.block_hashes[block] = h
            self.cached.setdefault(h, block)
            parent = h
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def free_sequence(self, seq: Sequence) -> None:
        """Return a sequence's blocks (finish, abort or preemption). Blocks still shared stay allocated."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0, "block freed twice"
            if self.ref_counts[block] == 0:
                # Blocks holding nothing reusable are handed out first; cached ones wait at the back.
                self.free[block] = None
                if self.block_hashes[block] is None:
                    self.free.move_to_end(block, last=False)
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0  # num_cached_tokens stays: it reports the last prefix hit
