"""Fast torch decoder: paged KV cache, batched prefill, greedy decode with device-resident state.

KV memory: one pool per layer of ``num_blocks * block_size`` token slots [slots, kv_heads, head_dim]; a
sequence owns the blocks the scheduler reserved for it (``DecodeRequest.blocks``), so memory follows the
tokens held, not a fixed maximum per slot. Block 0 is scratch: padded rows and finished rows write there.

Batch state lives on the device, one row per running sequence (rows 0..n-1, kept dense): next input token,
position, tokens generated, token limit, done flag, and the block table row (written once, at prefill).
A decode step advances positions, samples, feeds the sampled token to the next step and decides eos /
length on the device, and writes a report row per sequence (token or -1, its log-probability, finish code).
The host reads the report: on CUDA through a pinned buffer, one step behind (step n's report is read after
step n+1 is queued, so the GPU never waits for Python); elsewhere at once. Host bookkeeping is vectorised
and runs only when the batch composition changes (admission, release).

Attention, two paths:
- fast (CUDA, bf16/fp16, triton present, power-of-two block and head sizes): the Triton paged kernels
  (engine/kernels/paged_attention.py) read keys/values through the block table, fused kernels
  (engine/kernels/fused.py) do the norms, RoPE, K/V store and SiLU; batch padded to a ladder
  (1, 2, 4, 8, then every 16), and one CUDA graph per batch size, captured after an eager warm-up of that
  shape. Eager runs use the same padded shapes and split count, so graphs and eager give the same tokens.
- reference (CPU, fp32): SDPA over exactly the live length (keys gathered once per layer, no power-of-two
  padding), query heads folded onto their kv head (no key repeat); the exact path that gives NeMo's ids.

Prefill: the new requests packed into one row [1, T], each prompt's positions restarting at 0, T the total
prompt tokens rounded up by ``packed_length`` (few shapes, little padding); the padding is one more segment
and writes to scratch. Attention is causal within each prompt: torch's varlen flash attention on CUDA in
half precision, else SDPA per prompt segment (the same math as a causal row of its own, so exact on CPU
fp32). The linear layers run on exactly T rows. Every host-side index of the batch goes to the device in one
copy (pinned on CUDA).
"""

from __future__ import annotations

import inspect
import logging
from collections import deque
from contextlib import nullcontext

import numpy as np
import torch

from engine.llm import attention, rope_cos_sin
from engine.model import CanaryQwenModel

from .base import DecodeRequest

log = logging.getLogger(__name__)

SCRATCH_SLOT = 0
STOP, LENGTH = 1, 2  # finish codes in the report
REASONS = {STOP: "stop", LENGTH: "length"}


def ladder(limit: int) -> list[int]:
    """Batch sizes with a graph: 1, 2, 4, 8, then every 16 up to ``limit`` (and ``limit`` itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b < limit] + list(range(16, limit, 16)) + [limit]
    return sorted(set(sizes))


def bucket(n: int, rungs: list[int]) -> int:
    return next(r for r in rungs if r >= n)


def packed_length(tokens: int) -> int:
    """Length of a packed prefill row holding ``tokens`` prompt tokens: a multiple of 256 up to 2048, of 512
    up to 4096, of 1024 beyond. Up to 8192 tokens (``max_prefill_tokens``) that is 16 shapes (each new shape
    may cost a kernel plan or autotune on a GPU), with the padding under about 1/8 of the row above 2048 tokens,
    where the big admissions of an offline run fall (benchmarks/offline_sim.py: 4-9 % padding)."""
    step = 256 if tokens <= 2048 else 512 if tokens <= 4096 else 1024
    return max(step, -(-tokens // step) * step)


def _varlen_attention():
    """torch's packed (varlen) flash attention as ``f(q [T, h, hd], k/v [T, kvh, hd], cu [S+1] int32, max_len,
    scale) -> [T, h, hd]``, causal within each segment; None where torch has none. Its signature changed
    across releases (``is_causal`` in 2.9/2.10, ``window_size=(-1, 0)`` later, ``enable_gqa`` from 2.12): read
    it, and repeat the kv heads where grouped-query attention is not taken."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters

    def run(q, k, v, cu, max_len, scale):
        kw = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if "scale" in params:
            kw["scale"] = scale
        elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
            raise ValueError(f"this torch's varlen_attn has no scale argument; needed {scale}")
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:  # one copy of each kv head per query head of its group
                g = q.shape[1] // k.shape[1]
                k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # [T, h, hd]
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **kw)

    return run


def _kernels():
    from engine.kernels import paged_attention

    return paged_attention


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


class _PrefillView:
    """Cache seen by the layers during the packed prefill: store k/v at ``write`` [T], attention causal within
    each segment ``bounds[i]:bounds[i+1]`` (host ints; ``cu`` the same on the device, int32, for varlen)."""

    def __init__(self, kv: PagedKV, write: torch.Tensor, bounds: list[int], cu: torch.Tensor, varlen=None):
        self.kv, self.write, self.bounds, self.cu, self.varlen = kv, write, bounds, cu, varlen
        self.max_len = max(e - s for s, e in zip(bounds[:-1], bounds[1:]))

    def attend(self, layer, q, k, v, mask, scale):
        kt, vt = k[0].transpose(0, 1), v[0].transpose(0, 1)  # [1, kvh, T, hd] -> [T, kvh, hd]
        self.kv.k[layer][self.write] = kt
        self.kv.v[layer][self.write] = vt
        if self.varlen is not None:
            out = self.varlen(q[0].transpose(0, 1).contiguous(), kt.contiguous(), vt.contiguous(), self.cu,
                              self.max_len, scale)  # [T, h, hd]
            return out.transpose(0, 1)[None]  # [1, h, T, hd]
        b = self.bounds
        return torch.cat([attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], None, scale)
                          for s, e in zip(b[:-1], b[1:])], 2)  # [1, h, T, hd]


class _DecodeView:
    """Reference decode cache: store the new k/v at ``write`` [B], attend over ``read`` [B, L] slots."""

    def __init__(self, kv: PagedKV, write: torch.Tensor, read: torch.Tensor, mask: torch.Tensor):
        self.kv, self.write, self.read, self.mask = kv, write, read, mask

    def attend(self, layer, q, k, v, mask, scale):
        self.kv.k[layer][self.write] = k[:, :, 0]
        self.kv.v[layer][self.write] = v[:, :, 0]
        b, h, _, hd = q.shape
        kvh = k.shape[1]
        keys = self.kv.k[layer][self.read].transpose(1, 2)  # [B, kvh, L, hd]
        values = self.kv.v[layer][self.read].transpose(1, 2)
        # The query heads of one kv head become that head's queries: no repeated keys.
        out = attention(q.reshape(b, kvh, h // kvh, hd), keys, values, self.mask, scale)  # [B, kvh, g, hd]
        return out.reshape(b, h, 1, hd)


class TorchDecoder:
    """DecoderBackend on the exact model: ``add`` queues a request for prefill, ``step`` runs one decode step
    of the running ones and the prefill of new requests, ``release`` forgets a request."""

    name = "torch"

    def __init__(self, model: CanaryQwenModel, num_blocks: int, block_size: int, max_batch_size: int,
                 max_seq_len: int, eos_id: int, cuda_graphs: bool = True, num_splits: int = 4,
                 fast: bool | None = None):
        """``num_splits``: split-KV programs per sequence and kv head (fast path); ``fast``: force
        the Triton path on or off (default: CUDA bf16/fp16 with triton and a power-of-two block size)."""
        self.model, self.eos_id = model, eos_id
        self.block_size, self.num_blocks, self.num_splits = block_size, num_blocks, num_splits
        dev = model.device
        if not model.llm.fused:
            model.llm.fuse()  # one QKV and one gate-up GEMM per layer
        self.kv = PagedKV(model, num_blocks * block_size)
        self.pending: list[DecodeRequest] = []
        self.running: dict[int, int] = {}  # request id -> row
        self.failed: dict[int, str] = {}
        self.finished: dict[int, str] = {}
        self.logprobs: dict[int, list[float]] = {}
        self.max_blocks = -(-max_seq_len // block_size)
        self.max_batch_size = max_batch_size
        self.batch_rungs = ladder(max_batch_size)
        self.prefill_shapes: set[tuple[int, int]] = set()  # (rows, length) of every prefill: (1, packed length)
        self.prefill_tokens = 0  # prompt tokens prefilled
        self.prefill_padded_tokens = 0  # padding positions computed alongside them
        self.prefill_log: deque = deque(maxlen=65536)  # (rows, length, prompt tokens) of recent prefills
        # Packed flash attention for half precision on CUDA; elsewhere (and in fp32) SDPA per prompt.
        self._varlen = (_varlen_attention() if dev.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16)
                        else None)
        if fast is None:
            pow2 = all(x & (x - 1) == 0 for x in (block_size, model.cfg.llm.head_dim))
            fast = (dev.type == "cuda" and model.dtype in (torch.bfloat16, torch.float16) and pow2
                    and _kernels().available())
        self.fast = fast
        # Device state, one row per running sequence; rows >= n are padding (done, scratch block, length 1).
        m = max_batch_size
        self._tok = torch.zeros(m, dtype=torch.long, device=dev)  # next input token
        self._pos = torch.zeros(m, dtype=torch.long, device=dev)  # its position = tokens in the cache
        self._gen = torch.zeros(m, dtype=torch.long, device=dev)  # tokens generated
        self._limit = torch.ones(m, dtype=torch.long, device=dev)  # max_new_tokens
        self._done = torch.ones(m, dtype=torch.bool, device=dev)
        self._table = torch.zeros(m, self.max_blocks, dtype=torch.long, device=dev)
        self._report = torch.zeros(3, m, dtype=torch.float64, device=dev)  # token | logprob | finish code
        self._arange = torch.arange(self.max_blocks * block_size, device=dev)
        # Host mirror: row -> request id (-1 free), rows whose finish is not yet known, cache lengths.
        self.n = 0
        self._rid = np.full(m, -1, dtype=np.int64)
        self._open = np.zeros(m, dtype=bool)
        self._len = np.zeros(m, dtype=np.int64)  # exact on the reference path (reports are read at once)
        self._lag = dev.type == "cuda"  # read reports one step behind
        self._inflight: deque = deque()  # (host report, event, row -> request id) not yet read
        self._host = ([torch.empty(3, m, dtype=torch.float64, pin_memory=True) for _ in range(2)]
                      if dev.type == "cuda" else [])
        self._flip = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if cuda_graphs and self.fast and dev.type == "cuda":
            self.capture_graphs()

    # ---- request interface -------------------------------------------------------------------------

    def add(self, req: DecodeRequest) -> None:
        if not req.blocks:
            raise ValueError(f"request {req.request_id}: the torch decoder needs reserved KV blocks")
        need = req.prompt_len + req.max_new_tokens
        if len(req.blocks) * self.block_size < need:
            raise ValueError(f"request {req.request_id}: {len(req.blocks)} blocks hold fewer than {need} tokens")
        if need > self.max_blocks * self.block_size:
            raise ValueError(f"request {req.request_id}: {need} tokens exceed max_seq_len")
        if req.max_new_tokens < 1:
            raise ValueError(f"request {req.request_id}: max_new_tokens must be >= 1")
        self.pending.append(req)

    def release(self, request_id: int) -> None:
        row = self.running.pop(request_id, None)
        if row is not None:
            self._rid[row] = -1  # compacted at the next step
            self._open[row] = False
        self.pending = [r for r in self.pending if r.request_id != request_id]
        self.finished.pop(request_id, None)
        self.logprobs.pop(request_id, None)

    @property
    def active(self) -> int:
        return len(self.pending) + int(self._open[: self.n].sum())

    @torch.inference_mode()
    def step(self) -> dict[int, list[int]]:
        self._compact()
        if len(self.pending) > self.max_batch_size - self.n:
            raise RuntimeError(f"{self.n} running + {len(self.pending)} new sequences exceed "
                               f"max_batch_size={self.max_batch_size}")
        self._report[0].fill_(-1)
        decoded = bool(self._open[: self.n].any())
        if decoded:
            self._decode()
        prefilled = bool(self.pending)
        if prefilled:
            new, self.pending = self.pending, []
            self._prefill(new)
        if decoded or prefilled:
            self._queue_report()
        out: dict[int, list[int]] = {}
        keep = 1 if self._lag and (decoded or prefilled) else 0
        while len(self._inflight) > keep:
            self._read_report(out)
        return out

    # ---- batch state -------------------------------------------------------------------------------

    def _compact(self) -> None:
        """Drop released rows, keeping the order of the others: one gather per state tensor."""
        keep = np.nonzero(self._rid[: self.n] >= 0)[0]
        if len(keep) == self.n:
            return
        k, dev = len(keep), self.model.device
        idx = torch.from_numpy(keep).to(dev)
        for t in (self._tok, self._pos, self._gen, self._limit, self._done, self._table):
            t[:k] = t[idx]
        self._done[k : self.n] = True
        self._table[k : self.n] = 0
        self._pos[k : self.n] = 0
        for a in (self._rid, self._open, self._len):
            a[:k] = a[keep]
        self._rid[k : self.n] = -1
        self._open[k : self.n] = False
        self._len[k : self.n] = 0
        self.n = k
        self.running = dict(zip(self._rid[:k].tolist(), range(k)))

    def _sample(self, logits: torch.Tensor, rows, live: torch.Tensor) -> None:
        """Greedy token, its log-probability and the finish decision for ``rows`` (slice or index tensor);
        live [rows]: rows that produce a token now."""
        logits = logits.float()  # [B, vocab]
        top, tok = logits.max(-1)  # the first maximum, as argmax
        # log_softmax at the argmax: top - logsumexp = -log(sum(exp(logits - top))); one pass less than both
        logprob = -(logits - top[:, None]).exp_().sum(-1).log()
        gen = self._gen[rows] + live
        stop = live & (tok == self.eos_id)
        length = live & ~stop & (gen >= self._limit[rows])
        self._report[0, rows] = torch.where(live, tok, -1).double()
        self._report[1, rows] = logprob.double()
        self._report[2, rows] = (stop * STOP + length * LENGTH).double()
        self._tok[rows] = torch.where(live, tok, self._tok[rows])
        self._gen[rows] = gen
        self._done[rows] = self._done[rows] | stop | length

    def _queue_report(self) -> None:
        if self._host:
            host = self._host[self._flip]
            self._flip ^= 1
            host.copy_(self._report, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:  # CPU: the report is host memory already; a copy only if it is read a step later
            host, event = (self._report.clone() if self._lag else self._report), None
        self._inflight.append((host, event, self._rid[: self.n].copy()))

    def _read_report(self, out: dict[int, list[int]]) -> None:
        host, event, rids = self._inflight.popleft()
        if event is not None:
            event.synchronize()
        rep = host[:, : len(rids)].numpy()
        got = np.nonzero((rep[0] >= 0) & (rids >= 0))[0]
        if not len(got):
            return
        ids, toks, lps = rids[got].tolist(), rep[0, got].astype(np.int64).tolist(), rep[1, got].tolist()
        running = self.running
        for rid, t, lp in zip(ids, toks, lps):
            if rid in running:  # released since: drop
                out[rid] = [t]
                self.logprobs.setdefault(rid, []).append(lp)
        for i in np.nonzero(rep[2, got] > 0)[0].tolist():
            rid = ids[i]
            if rid in running:
                self.finished[rid] = REASONS[int(rep[2, got[i]])]
                self._open[running[rid]] = False

    # ---- prefill -----------------------------------------------------------------------------------

    def _prefill(self, reqs: list[DecodeRequest]) -> None:
        model, dev, bs = self.model, self.model.device, self.block_size
        b = len(reqs)
        lens = np.array([r.prompt_len for r in reqs], dtype=np.int64)
        total = int(lens.sum())
        T = packed_length(total)
        starts = np.concatenate([[0], np.cumsum(lens)])  # [B+1] offset of each prompt in the packed row
        bounds = starts.tolist() + ([T] if T > total else [])  # the padding is a segment too: all rows defined
        text = [r.pre_ids + r.post_ids for r in reqs]
        n_text = sum(len(t) for t in text)
        n_audio = sum(r.audio.shape[0] for r in reqs)
        pad_row = n_text + n_audio  # index of the zero embedding
        src = np.full(T, pad_row, dtype=np.int64)  # row of each position in [text; audio; zero]
        write = np.full(T, SCRATCH_SLOT, dtype=np.int64)
        pos = np.zeros(T, dtype=np.int64)  # position within its own prompt (0 for the padding)
        table = np.zeros((b, self.max_blocks), dtype=np.int64)
        t_at, a_at = 0, n_text
        for i, r in enumerate(reqs):
            s, npre, na, npost = int(starts[i]), len(r.pre_ids), r.audio.shape[0], len(r.post_ids)
            src[s : s + npre] = np.arange(t_at, t_at + npre)
            src[s + npre : s + npre + na] = np.arange(a_at, a_at + na)
            src[s + npre + na : s + lens[i]] = np.arange(t_at + npre, t_at + npre + npost)
            t_at, a_at = t_at + npre + npost, a_at + na
            blocks = np.asarray(r.blocks[: self.max_blocks], dtype=np.int64)
            table[i, : len(blocks)] = blocks
            p = np.arange(lens[i])
            pos[s : s + lens[i]] = p
            write[s : s + lens[i]] = blocks[p // bs] * bs + p % bs
        rows = np.arange(self.n, self.n + b)
        limits = np.array([r.max_new_tokens for r in reqs], dtype=np.int64)
        last = starts[1:] - 1  # each prompt's last token
        ids = np.fromiter((t for row in text for t in row), dtype=np.int64, count=n_text)
        parts = [ids, src, write, pos, last, rows, lens, limits, table.ravel(), np.asarray(bounds, dtype=np.int64)]
        host = torch.from_numpy(np.concatenate(parts))
        if dev.type == "cuda":
            host = host.pin_memory()
        flat = host.to(dev, non_blocking=True)  # the one host -> device copy of the batch
        d_ids, d_src, d_write, d_pos, d_last, d_rows, d_lens, d_limits, d_table, d_cu = flat.split(
            [len(x) for x in parts])
        embed_src = torch.cat([model.embed_tokens(d_ids), *(r.audio.to(dev, model.dtype) for r in reqs),
                               torch.zeros(1, model.cfg.llm.hidden_size, dtype=model.dtype, device=dev)])
        embeds = embed_src[d_src][None]  # [1, T, H], packed
        ctx = nullcontext()
        if dev.type == "cuda" and self._varlen is None:
            from torch.nn.attention import sdpa_kernel

            from .cuda_settings import sdpa_backends

            ctx = sdpa_kernel(sdpa_backends(model.dtype))
        view = _PrefillView(self.kv, d_write, bounds, d_cu.to(torch.int32), self._varlen)
        with ctx:
            hidden = model.llm(embeds, d_pos[None], None, view)
        last_hidden = hidden[0, d_last]  # [B, H]
        self._table[d_rows] = d_table.view(b, self.max_blocks)
        self._pos[d_rows] = d_lens
        self._limit[d_rows] = d_limits
        self._gen[d_rows] = 0
        self._done[d_rows] = False
        self._sample(model.logits(last_hidden), d_rows, torch.ones(b, dtype=torch.bool, device=dev))
        for i, r in enumerate(reqs):
            self.running[r.request_id] = self.n + i
        self._rid[rows] = [r.request_id for r in reqs]
        self._open[rows] = True
        self._len[rows] = lens
        self.n += b
        self.prefill_shapes.add((1, T))
        self.prefill_log.append((1, T, total))
        self.prefill_tokens += total
        self.prefill_padded_tokens += T - total

    # ---- decode ------------------------------------------------------------------------------------

    def _decode(self) -> None:
        if self.fast:
            B = bucket(self.n, self.batch_rungs)
            graph = self.graphs.get(B)
            if graph is not None:
                graph.replay()
            else:
                self._decode_fast(B)
        else:
            self._decode_reference(self.n)
        self._len[: self.n] += self._open[: self.n]

    def _inputs(self, B: int):
        """Input token, position and write slot [B] of rows [:B]; finished and padded rows write to scratch."""
        pos, live = self._pos[:B], ~self._done[:B]
        page = (pos // self.block_size).clamp(max=self.max_blocks - 1)
        slot = self._table[:B].gather(1, page[:, None])[:, 0] * self.block_size + pos % self.block_size
        return self._tok[:B], pos, torch.where(live, slot, SCRATCH_SLOT), live

    def _advance(self, B: int, hidden: torch.Tensor, live: torch.Tensor) -> None:
        self._sample(self.model.logits(hidden[:, -1]), slice(0, B), live)
        self._pos[:B] += live

    def _decode_fast(self, B: int) -> None:
        """Static-shape step over rows [:B]: what a CUDA graph captures. The layers of engine.llm.Qwen3 with
        fused kernels: per layer the QKV GEMM (+ LoRA), one norm + RoPE + K/V store epilogue, paged attention,
        o_proj, add + norm, the gate-up GEMM, SiLU * up, down_proj, add + the next layer's input norm."""
        from engine.kernels import fused

        pa = _kernels()
        llm, cfg = self.model.llm, self.model.cfg.llm
        tok, pos, write, live = self._inputs(B)
        h, kvh, hd, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
        x = self.model.embed_tokens(tok)  # [B, H]
        if llm._inv_freq.device != x.device:
            llm._inv_freq = llm._inv_freq.to(x.device)
        cos, sin = rope_cos_sin(llm._inv_freq, pos[:, None], x.dtype)  # [B, 1, hd]
        cos, sin = cos[:, 0], sin[:, 0]
        lens, table = pos + 1, self._table[:B]
        normed = fused.rmsnorm(x, llm.layers[0].input_layernorm.weight, eps)
        for i, layer in enumerate(llm.layers):
            a, kc, vc = layer.self_attn, self.kv.k[i], self.kv.v[i]
            q = fused.qkv_epilogue(a._qkv(normed), a.q_norm.weight, a.k_norm.weight, cos, sin, eps, kc, vc, write,
                                   h, kvh, hd)  # [B, h, hd]
            out = pa.paged_decode(q, kc, vc, table, lens, self.block_size, hd**-0.5, self.num_splits)
            x, normed = fused.rmsnorm(a.o_proj(out.view(B, h * hd)), layer.post_attention_layernorm.weight, eps,
                                      residual=x)
            m = layer.mlp
            down = m.down_proj(fused.silu_mul(m._gate_up(normed)))
            nxt = llm.layers[i + 1].input_layernorm if i + 1 < len(llm.layers) else llm.norm
            x, normed = fused.rmsnorm(down, nxt.weight, eps, residual=x)
        self._advance(B, normed[:, None], live)

    def _decode_reference(self, B: int) -> None:
        """Rows [:B] over exactly the longest live length (an upper bound the host tracks)."""
        bs = self.block_size
        L = int(self._len[:B].max()) + 1
        tok, pos, write, live = self._inputs(B)
        ar = self._arange[:L]
        read = self._table[:B, ar // bs] * bs + ar % bs  # [B, L] slot of every position
        mask = (ar[None, :] < (pos + 1)[:, None])[:, None, None, :]  # [B, 1, 1, L]
        view = _DecodeView(self.kv, write, read, mask)
        hidden = self.model.llm(self.model.embed_tokens(tok)[:, None], pos[:, None], mask, view)
        self._advance(B, hidden, live)

    def capture_graphs(self) -> None:
        """One CUDA graph per batch rung, largest first, sharing one memory pool; each shape is run eagerly
        first (Triton compilation, cuBLAS heuristics, lazy initialisation stay outside the capture)."""
        # All rows are padding now (done, scratch block): warm-up and capture write to scratch only.
        pool = None
        for B in reversed(self.batch_rungs):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(2):
                    self._decode_fast(B)
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.inference_mode(), torch.cuda.graph(g, pool=pool):
                self._decode_fast(B)
            pool = g.pool()
            self.graphs[B] = g
        torch.cuda.synchronize()
        log.info("captured %d decode graphs (batch sizes %s)", len(self.graphs), self.batch_rungs)
