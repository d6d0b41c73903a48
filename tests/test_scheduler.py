"""Scheduler and block bookkeeping invariants under random arrivals, lengths, cancellations and failures."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.scheduler import BlockAllocator, QueueFull, Scheduler, Sequence


def check(s: Scheduler) -> None:
    a = s.allocator
    held = [b for seq in s.running.values() for b in seq.blocks]
    assert len(held) == len(set(held)) == a.used_blocks  # no block shared, none leaked
    assert a.used_blocks + a.free_blocks == a.capacity
    assert 0 not in held  # the scratch block is never handed out
    assert len(s.running) <= s.max_running
    assert all(not seq.blocks for seq in s.waiting)
    for seq in s.running.values():
        assert len(seq.blocks) * a.block_size >= seq.max_tokens  # worst case reserved: never over-commits


ops = st.lists(st.tuples(st.sampled_from(["add", "step", "finish", "cancel_waiting", "fail"]),
                         st.integers(1, 300), st.integers(1, 64)), min_size=1, max_size=120)


@settings(max_examples=150, deadline=None)
@given(ops=ops, num_blocks=st.integers(8, 80), block_size=st.sampled_from([1, 4, 16]),
       max_running=st.integers(1, 8), max_waiting=st.integers(1, 20), prefill=st.integers(1, 400),
       refill=st.sampled_from([0.0, 0.25, 0.5, 1.0]))
def test_random_schedules_keep_invariants(ops, num_blocks, block_size, max_running, max_waiting, prefill, refill):
    s = Scheduler(BlockAllocator(num_blocks, block_size), max_running, max_waiting, prefill, refill)
    finished: dict[int, int] = {}
    next_id = 0
    for op, a, b in ops:
        if op == "add":
            seq = Sequence(next_id, prompt_len=a, max_new_tokens=b)
            next_id += 1
            try:
                s.add(seq)
            except ValueError:  # can never fit the pool: refused up front
                assert s.allocator.blocks_for(seq.max_tokens) > s.allocator.capacity
            except QueueFull:
                assert len(s.waiting) == max_waiting
        elif op == "step":
            before = len(s.waiting)
            admitted = s.schedule()
            assert len(admitted) <= before
            free = max_running - (len(s.running) - len(admitted))
            refill_due = free > 0 and (len(s.running) == len(admitted) or free >= s.refill_slots or before <= free)
            if before and refill_due and not admitted:
                head = s.waiting[0]  # only a lack of blocks may hold the queue's head back
                assert s.allocator.blocks_for(head.max_tokens) > s.allocator.free_blocks
            if admitted:
                assert refill_due  # chunked admission: never a refill of fewer free slots than asked for
        elif op in ("finish", "fail") and s.running:
            rid = sorted(s.running)[a % len(s.running)]
            assert s.finish(rid).id == rid
            finished[rid] = finished.get(rid, 0) + 1
            assert s.finish(rid) is None  # a second retirement is a no-op
        elif op == "cancel_waiting" and s.waiting:
            rid = s.waiting[a % len(s.waiting)].id
            assert s.finish(rid).state == "finished"
            finished[rid] = finished.get(rid, 0) + 1
        check(s)
    while not s.idle:  # drain: everything finishes exactly once and every block comes back
        s.schedule()
        for rid in list(s.running):
            s.finish(rid)
            finished[rid] = finished.get(rid, 0) + 1
        check(s)
    assert s.allocator.used_blocks == 0
    assert all(n == 1 for n in finished.values())


def test_fifo_head_is_not_starved():
    s = Scheduler(BlockAllocator(11, 10), max_running=8, max_waiting=10, max_prefill_tokens=10_000)
    s.add(Sequence(0, 50, 10))  # 6 blocks
    s.add(Sequence(1, 50, 10))  # 6 blocks: must wait for the first
    s.add(Sequence(2, 5, 5))  # 1 block: would fit, but must not jump the queue
    assert [q.id for q in s.schedule()] == [0]
    assert s.schedule() == []
    s.finish(0)
    assert [q.id for q in s.schedule()] == [1, 2]


def test_prefill_budget_admits_at_least_one():
    s = Scheduler(BlockAllocator(100, 16), max_running=8, max_waiting=10, max_prefill_tokens=100)
    for i in range(4):
        s.add(Sequence(i, 80, 8))
    assert len(s.schedule()) == 1  # 80 + 80 > 100
    assert len(s.schedule()) == 1


def test_allocator_errors():
    a = BlockAllocator(4, 2)
    blocks = a.allocate(3)
    with pytest.raises(RuntimeError, match="asked for 1 KV blocks, 0 free"):
        a.allocate(1)
    a.free(blocks)
    with pytest.raises(RuntimeError, match="freed twice"):
        a.free(blocks[:1])
    with pytest.raises(ValueError):
        BlockAllocator(1, 16)


def test_refill_waits_for_a_quarter_of_the_batch_unless_everything_fits():
    s = Scheduler(BlockAllocator(1000, 16), max_running=8, max_waiting=100, max_prefill_tokens=10_000,
                  refill_fraction=0.25)
    for i in range(19):
        s.add(Sequence(i, 10, 5))
    assert len(s.schedule()) == 8  # nothing running: fill the batch
    s.finish(0)
    assert s.schedule() == []  # 1 free slot of 8: wait for a quarter
    s.finish(1)
    assert [q.id for q in s.schedule()] == [8, 9]  # 2 of 8 free: refill, in arrival order
    while len(s.waiting) > 1:
        s.finish(next(iter(s.running)))
        s.finish(next(iter(s.running)))
        s.schedule()
    s.finish(next(iter(s.running)))
    assert len(s.schedule()) == 1  # the last waiting one fits in the one free slot: no reason to wait
