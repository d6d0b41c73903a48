"""Fast torch decoder: paged KV cache, batched prefill, greedy decode with optional CUDA graphs.

KV memory: one pool per layer of ``num_blocks * block_size`` token slots [slots, kv_heads, head_dim]; a
sequence owns the blocks the scheduler reserved for it (``DecodeRequest.blocks``), so memory follows the
tokens held, not a fixed maximum per slot. Block 0 is scratch: padded rows of a batch write there.

Prefill: the new requests as one right-padded batch (prompt ids embedded and audio embeddings spliced on
the device); their keys/values go to their blocks, attention stays within each prompt.

Decode: one query per sequence. Each sequence's keys are gathered from its blocks up to a length bucket
(powers of two in blocks), so attention costs what the longest sequence in the batch holds, rounded up.
Batch and length are padded to a fixed ladder, which gives static shapes: on CUDA one graph per
(batch, length) rung is captured at start-up and replayed; eager runs use the same padded shapes, so
graphs and eager give identical tokens. The only device->host copy per step is the new tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.model import CanaryQwenModel

from .base import DecodeRequest

log = logging.getLogger(__name__)

SCRATCH_SLOT = 0


def ladder(limit: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16 up to ``limit`` (and ``limit`` itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < limit] + list(range(16, limit, 16)) + [limit]
    return sorted(set(sizes))


def bucket(n: int, rungs: list[int]) -> int:
    return next(r for r in rungs if r >= n)


class PagedKV:
    """Per-layer key/value pools [num_slots, kv_heads, head_dim] in the model dtype."""

    def __init__(self, model: CanaryQwenModel, num_slots: int):
        cfg = model.cfg.llm
        shape = (num_slots, cfg.num_kv_heads, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_layers)]
        self.v = [torch.zeros(shape, dtype=model.dtype, device=model.device) for _ in range(cfg.num_layers)]

    @staticmethod
    def bytes_per_token(model: CanaryQwenModel) -> int:
        cfg = model.cfg.llm
        return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.embed_tokens.weight.element_size()


@dataclass
class PagedView:
    """The cache object the LLM layers see for one forward (see engine.llm.KVCache for the protocol)."""

    kv: PagedKV
    write: torch.Tensor  # [B, q] slot of each new token
    read: torch.Tensor | None  # [B, L] slots to attend to, or None: attend within the new tokens only

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v: [B, kv_heads, q, head_dim] -> stored; returns [B, kv_heads, L, head_dim] to attend to."""
        slots = self.write.reshape(-1)
        self.kv.k[layer][slots] = k.transpose(1, 2).reshape(-1, k.shape[1], k.shape[3])  # [B*q, kvh, hd]
        self.kv.v[layer][slots] = v.transpose(1, 2).reshape(-1, v.shape[1], v.shape[3])
        if self.read is None:
            return k, v
        keys = self.kv.k[layer][self.read]  # [B, L, kv_heads, head_dim]
        values = self.kv.v[layer][self.read]
        return keys.transpose(1, 2), values.transpose(1, 2)


@dataclass
class _Seq:
    req: DecodeRequest
    length: int  # tokens in the cache
    last: int  # last generated token (the next decode input)
    generated: int
    done: bool


class TorchDecoder:
    """DecoderBackend on the exact model: ``add`` queues a request for prefill, ``step`` runs the prefill
    of new requests and one decode step of the running ones, ``release`` forgets a request."""

    name = "torch"

    def __init__(self, model: CanaryQwenModel, num_blocks: int, block_size: int, max_batch_size: int,
                 max_seq_len: int, eos_id: int, cuda_graphs: bool = True):
        self.model, self.eos_id = model, eos_id
        self.block_size, self.num_blocks = block_size, num_blocks
        self.kv = PagedKV(model, num_blocks * block_size)
        self.pending: list[DecodeRequest] = []
        self.running: dict[int, _Seq] = {}
        max_blocks = -(-max_seq_len // block_size)
        self.batch_rungs = ladder(max_batch_size)
        self.block_rungs = sorted({min(2**i, max_blocks) for i in range(max_blocks.bit_length() + 1)})
        dev = model.device
        # Static decode inputs; a (batch, blocks) rung uses the leading [:B] / [:B, :nb] views.
        self._tokens = torch.zeros(max_batch_size, dtype=torch.long, device=dev)
        self._pos = torch.zeros(max_batch_size, dtype=torch.long, device=dev)
        self._slot = torch.zeros(max_batch_size, dtype=torch.long, device=dev)
        self._table = torch.zeros(max_batch_size, self.block_rungs[-1], dtype=torch.long, device=dev)
        self._lens = torch.ones(max_batch_size, dtype=torch.long, device=dev)
        self._out = torch.zeros(max_batch_size, dtype=torch.long, device=dev)
        self._arange = torch.arange(self.block_rungs[-1] * block_size, device=dev)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if cuda_graphs and dev.type == "cuda":
            self.capture_graphs()

    # ---- request interface -------------------------------------------------------------------------

    def add(self, req: DecodeRequest) -> None:
        if not req.blocks:
            raise ValueError(f"request {req.request_id}: the torch decoder needs reserved KV blocks")
        need = req.prompt_len + req.max_new_tokens
        if len(req.blocks) * self.block_size < need:
            raise ValueError(f"request {req.request_id}: {len(req.blocks)} blocks hold fewer than {need} tokens")
        if need > self.block_rungs[-1] * self.block_size:
            raise ValueError(f"request {req.request_id}: {need} tokens exceed max_seq_len")
        self.pending.append(req)

    def release(self, request_id: int) -> None:
        self.running.pop(request_id, None)
        self.pending = [r for r in self.pending if r.request_id != request_id]

    @property
    def active(self) -> int:
        return len(self.pending) + sum(not s.done for s in self.running.values())

    @torch.inference_mode()
    def step(self) -> dict[int, list[int]]:
        out: dict[int, list[int]] = {}
        decode = [s for s in self.running.values() if not s.done]
        if decode:
            for s, tok in zip(decode, self._decode(decode)):
                out[s.req.request_id] = [self._advance(s, tok)]
        if self.pending:
            new, self.pending = self.pending, []
            for req, tok in zip(new, self._prefill(new)):
                s = _Seq(req, req.prompt_len, tok, 0, False)
                self.running[req.request_id] = s
                out[req.request_id] = [self._advance(s, tok)]
        return out

    def _advance(self, s: _Seq, tok: int) -> int:
        s.last, s.generated = tok, s.generated + 1
        s.done = tok == self.eos_id or s.generated >= s.req.max_new_tokens
        return tok

    # ---- prefill -----------------------------------------------------------------------------------

    def _slots(self, blocks: list[int], start: int, n: int) -> list[int]:
        bs = self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, start + n)]

    def _prefill(self, reqs: list[DecodeRequest]) -> list[int]:
        model, dev = self.model, self.model.device
        lens = [r.prompt_len for r in reqs]
        n = max(lens)
        embeds = torch.zeros(len(reqs), n, model.cfg.llm.hidden_size, dtype=model.dtype, device=dev)
        write = torch.full((len(reqs), n), SCRATCH_SLOT, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids = torch.tensor(r.pre_ids + r.post_ids, device=dev)
            text = model.embed_tokens(ids)  # [n_pre + n_post, H]
            row = torch.cat([text[: len(r.pre_ids)], r.audio.to(dev, model.dtype), text[len(r.pre_ids) :]])
            embeds[i, : row.shape[0]] = row  # right padding: positions are simply 0..len-1
            write[i, : lens[i]] = torch.tensor(self._slots(r.blocks, 0, lens[i]))
        valid = torch.arange(n)[None, :] < torch.tensor(lens)[:, None]  # [B, n]
        causal = torch.ones(n, n, dtype=torch.bool).tril()
        mask = (causal[None] & valid[:, None, :]).unsqueeze(1).to(dev)  # [B, 1, n, n]; pad rows see the prompt
        positions = torch.arange(n, device=dev).expand(len(reqs), n)
        hidden = model.llm(embeds, positions, mask, PagedView(self.kv, write.to(dev), None))
        last = hidden[torch.arange(len(reqs), device=dev), torch.tensor(lens, device=dev) - 1]  # [B, H]
        return model.logits(last).argmax(-1).tolist()

    # ---- decode ------------------------------------------------------------------------------------

    def _decode(self, seqs: list[_Seq]) -> list[int]:
        b = len(seqs)
        B = bucket(b, self.batch_rungs)
        nb = bucket(max(-(-(s.length + 1) // self.block_size) for s in seqs), self.block_rungs)
        table = torch.zeros(B, nb, dtype=torch.long)  # padded rows: scratch block 0, length 1
        lens = torch.ones(B, dtype=torch.long)
        host = torch.zeros(3, B, dtype=torch.long)  # tokens, positions, write slots
        for i, s in enumerate(seqs):
            blocks = s.req.blocks[:nb]
            table[i, : len(blocks)] = torch.tensor(blocks)
            host[0, i], host[1, i] = s.last, s.length
            host[2, i] = self._slots(s.req.blocks, s.length, 1)[0]
            lens[i] = s.length + 1
        self._tokens[:B].copy_(host[0], non_blocking=True)
        self._pos[:B].copy_(host[1], non_blocking=True)
        self._slot[:B].copy_(host[2], non_blocking=True)
        self._table[:B, :nb].copy_(table, non_blocking=True)
        self._lens[:B].copy_(lens, non_blocking=True)
        graph = self.graphs.get((B, nb))
        if graph is not None:
            graph.replay()
        else:
            self._decode_forward(B, nb)
        for s in seqs:
            s.length += 1
        return self._out[:b].tolist()  # the one device -> host copy of the step

    def _decode_forward(self, B: int, nb: int) -> None:
        """Static-shape decode over the [:B] / [:B, :nb] views of the input buffers -> self._out[:B]."""
        bs = self.block_size
        ar = self._arange[: nb * bs]
        table = self._table[:B, :nb]
        read = table[:, ar // bs] * bs + ar % bs  # [B, L] slot of every position
        mask = (ar[None, :] < self._lens[:B, None])[:, None, None, :]  # [B, 1, 1, L]
        x = self.model.embed_tokens(self._tokens[:B])[:, None]  # [B, 1, H]
        view = PagedView(self.kv, self._slot[:B, None], read)
        hidden = self.model.llm(x, self._pos[:B, None], mask, view)
        self._out[:B] = self.model.logits(hidden[:, -1]).argmax(-1)

    def capture_graphs(self) -> None:
        """One CUDA graph per (batch, length) rung, largest first, sharing one memory pool."""
        # Inputs at capture: token 0 at position 0, written to the scratch slot: harmless.
        self._table.zero_(), self._lens.fill_(1), self._slot.zero_(), self._pos.zero_(), self._tokens.zero_()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up: kernel selection and lazy initialisation outside capture
                self._decode_forward(self.batch_rungs[-1], self.block_rungs[-1])
        torch.cuda.current_stream().wait_stream(stream)
        pool = None
        with torch.inference_mode():
            for B in reversed(self.batch_rungs):
                for nb in reversed(self.block_rungs):
                    g = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(g, pool=pool):
                        self._decode_forward(B, nb)
                    pool = g.pool()
                    self.graphs[(B, nb)] = g
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch rungs %s, block rungs %s)", len(self.graphs),
                 self.batch_rungs, self.block_rungs)
