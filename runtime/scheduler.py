"""Admission and KV bookkeeping for in-flight batching. Plain Python (no torch), tested without a model.

KV memory is a pool of fixed-size blocks. A sequence reserves the blocks for its worst case
(prompt + max_new_tokens) when it is admitted and returns them the moment it finishes, is cancelled or
fails. Reserving the worst case means admission can never over-commit the pool and nothing ever has to be
preempted; the price is capacity held for tokens a sequence may not generate, which is small next to a
GPU's pool (Qwen3-1.7B in bf16: 112 KiB per token, so 40 GiB hold ~370k tokens, ~480 sequences of 40 s
audio + 256 new tokens: more than the decode batch sizes that pay off).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


class QueueFull(RuntimeError):
    """The waiting queue is at its limit: retry later."""


class BlockAllocator:
    """Block ids 0..num_blocks-1; the first ``reserved`` ids are never handed out (block 0 is the decoder's
    scratch block, written by the padded rows of a batch)."""

    def __init__(self, num_blocks: int, block_size: int, reserved: int = 1):
        if num_blocks <= reserved or block_size < 1:
            raise ValueError(f"need more than {reserved} blocks of >= 1 token, got {num_blocks} x {block_size}")
        self.num_blocks, self.block_size, self.reserved = num_blocks, block_size, reserved
        self._free = list(range(num_blocks - 1, reserved - 1, -1))  # pop() hands out low ids first
        self._used: set[int] = set()

    @property
    def capacity(self) -> int:
        return self.num_blocks - self.reserved

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return len(self._used)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"asked for {n} KV blocks, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        self._used.update(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            if b not in self._used:
                raise RuntimeError(f"KV block {b} freed twice or never allocated")
            self._used.remove(b)
            self._free.append(b)


@dataclass
class Sequence:
    id: int
    prompt_len: int  # tokens before generation (text + audio frames)
    max_new_tokens: int
    blocks: list[int] = field(default_factory=list)
    state: str = "waiting"  # waiting -> running -> finished

    @property
    def max_tokens(self) -> int:
        return self.prompt_len + self.max_new_tokens


class Scheduler:
    """FIFO admission under three limits: running sequences, KV blocks, and prompt tokens per step (so one
    step's prefill stays short and running sequences keep streaming).

    Admission comes in chunks: a running batch is refilled only once ``refill_fraction`` of its slots are free
    (or nothing runs, or everything waiting fits now). Each admission stalls the running streams for one
    encoder + prefill pass, so a few big admissions cost less than one small admission per step, and the
    prefill and encoder batches come out big.
    """

    def __init__(self, allocator: BlockAllocator, max_running: int, max_waiting: int, max_prefill_tokens: int,
                 refill_fraction: float = 0.0):
        if not 0.0 <= refill_fraction <= 1.0:
            raise ValueError(f"refill_fraction must be in [0, 1], got {refill_fraction}")
        self.allocator = allocator
        self.max_running, self.max_waiting, self.max_prefill_tokens = max_running, max_waiting, max_prefill_tokens
        self.refill_slots = max(1, math.ceil(max_running * refill_fraction))
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}

    def check_fits(self, seq: Sequence) -> None:
        """A sequence bigger than the whole pool would wait forever: refuse it up front."""
        need = self.allocator.blocks_for(seq.max_tokens)
        if need > self.allocator.capacity:
            raise ValueError(f"request needs {seq.max_tokens} tokens of KV cache ({need} blocks), more than the "
                             f"whole pool ({self.allocator.capacity} blocks of {self.allocator.block_size})")

    def add(self, seq: Sequence) -> None:
        self.check_fits(seq)
        if len(self.waiting) >= self.max_waiting:
            raise QueueFull(f"{len(self.waiting)} requests already waiting")
        self.waiting.append(seq)

    def should_refill(self) -> bool:
        """Whether this step admits: a slot is free and either nothing runs, ``refill_slots`` are free, or
        every waiting sequence fits in the free slots (then waiting longer gains nothing)."""
        free = self.max_running - len(self.running)
        if free <= 0 or not self.waiting:
            return False
        return not self.running or free >= self.refill_slots or len(self.waiting) <= free

    def schedule(self) -> list[Sequence]:
        """Admit waiting sequences in arrival order while they fit; reserve their blocks. Stops at the first
        that does not fit so a long request is not starved by shorter ones behind it."""
        if not self.should_refill():
            return []
        admitted, tokens = [], 0
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            need = self.allocator.blocks_for(seq.max_tokens)
            if need > self.allocator.free_blocks:
                break
            if admitted and tokens + seq.prompt_len > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            seq.blocks = self.allocator.allocate(need)
            seq.state = "running"
            self.running[seq.id] = seq
            admitted.append(seq)
            tokens += seq.prompt_len
        return admitted

    def finish(self, seq_id: int) -> Sequence | None:
        """Retire a waiting or running sequence and free its blocks. Returns it, or None if unknown or
        already finished (so a racing cancel and completion retire it once)."""
        seq = self.running.pop(seq_id, None)
        if seq is None:
            seq = next((s for s in self.waiting if s.id == seq_id), None)
            if seq is None:
                return None
            self.waiting.remove(seq)
        self.allocator.free(seq.blocks)
        seq.blocks = []
        seq.state = "finished"
        return seq

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running
