"""Paged decode attention and the paged K/V store, as Triton kernels.

KV pools are [num_slots, kv_heads, head_dim] per layer (slot = block * block_size + offset); a sequence's
block table row lists its blocks in order. Block 0 is scratch: padded rows point there.

``paged_decode``: one query per sequence, all query heads of a kv head in one program (GQA: each key and
value is loaded once for its group). Split-KV (flash-decoding): program ``s`` of ``num_splits`` handles the
sequence's blocks s, s + S, s + 2S, ...; a second kernel combines the partial softmaxes. The split count is
fixed by the caller, never derived from lengths, so an eager run and a CUDA graph replay of the same batch
give the same bits. No length bucket and no mask: each program reads its lengths from device memory.

Only long-stable ``tl`` APIs are used (load/store/where/sum/max/exp, runtime-bound ``range``), so the kernels
compile with Triton 3.6 and current releases, and run on CPU tensors under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU installs without triton: the torch reference path is used instead
    triton = None


def available() -> bool:
    return triton is not None


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


if triton is not None:

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, skt, skh, svt, svh, scs, sch,
                         KVH: tl.constexpr, KVHP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        h = tl.arange(0, KVHP)
        d = tl.arange(0, DP)
        m = (h < KVH)[:, None] & (d < D)[None, :]
        k = tl.load(k_ptr + t * skt + h[:, None] * skh + d[None, :], mask=m)
        v = tl.load(v_ptr + t * svt + h[:, None] * svh + d[None, :], mask=m)
        dst = slot * scs + h[:, None] * sch + d[None, :]
        tl.store(kc_ptr + dst, k, mask=m)
        tl.store(vc_ptr + dst, v, mask=m)

    @triton.jit
    def _decode_split_kernel(q_ptr, kc_ptr, vc_ptr, table_ptr, lens_ptr, po_ptr, pm_ptr, pl_ptr, scale,
                             sqb, sqh, scs, sch, stb, H,
                             G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, DP: tl.constexpr,
                             BS: tl.constexpr, S: tl.constexpr):
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        s = tl.program_id(2)
        g = tl.arange(0, GP)
        d = tl.arange(0, DP)
        t = tl.arange(0, BS)
        gm = g < G
        dm = d < D
        heads = kvh * G + g
        q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + d[None, :], mask=gm[:, None] & dm[None, :], other=0.0)
        q = q.to(tl.float32) * scale  # [GP, DP]
        n = tl.load(lens_ptr + b)
        pages = (n + BS - 1) // BS
        m_i = tl.full([GP], float("-inf"), tl.float32)
        l_i = tl.zeros([GP], tl.float32)
        acc = tl.zeros([GP, DP], tl.float32)
        for j in range(s, pages, S):
            blk = tl.load(table_ptr + b * stb + j).to(tl.int64)
            valid = j * BS + t < n  # [BS]
            src = (blk * BS + t)[:, None] * scs + kvh * sch + d[None, :]  # [BS, DP]
            lm = valid[:, None] & dm[None, :]
            k = tl.load(kc_ptr + src, mask=lm, other=0.0).to(tl.float32)
            v = tl.load(vc_ptr + src, mask=lm, other=0.0).to(tl.float32)  # issued together: both in flight
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [GP, BS]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            m_i = m_new
        row = (b * H + heads) * S + s  # [GP] partial index of (b, head, split)
        tl.store(po_ptr + row[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])
        tl.store(pm_ptr + row, m_i, mask=gm)
        tl.store(pl_ptr + row, l_i, mask=gm)

    @triton.jit
    def _decode_combine_kernel(po_ptr, pm_ptr, pl_ptr, o_ptr, sob, soh,
                               D: tl.constexpr, DP: tl.constexpr, S: tl.constexpr, SP: tl.constexpr, H):
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.arange(0, SP)
        d = tl.arange(0, DP)
        sm = s < S
        row = (b * H + h) * S + s
        m = tl.load(pm_ptr + row, mask=sm, other=float("-inf"))
        l = tl.load(pl_ptr + row, mask=sm, other=0.0)
        top = tl.max(m, axis=0)
        w = tl.where(l > 0, tl.exp(m - top), 0.0)  # splits that saw no key weigh nothing
        acc = tl.load(po_ptr + row[:, None] * D + d[None, :], mask=sm[:, None] & (d < D)[None, :], other=0.0)
        out = tl.sum(acc * w[:, None], axis=0) / tl.sum(l * w, axis=0)
        tl.store(o_ptr + b * sob + h * soh + d, out.to(o_ptr.dtype.element_ty), mask=d < D)


def _check_pool(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError(f"k/v pools must be alike with a contiguous last dim: {tuple(k_cache.shape)} "
                         f"{k_cache.stride()} vs {tuple(v_cache.shape)} {v_cache.stride()}")


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k, v: [T, kv_heads, head_dim] (any strides, last dim contiguous) -> pools [num_slots, kv_heads,
    head_dim] at ``slots`` [T] (int). One launch for keys and values."""
    _check_pool(k_cache, v_cache)
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    t, kvh, d = k.shape
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(0), k_cache.stride(1), KVH=kvh, KVHP=_pow2(kvh), D=d, DP=_pow2(d))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                 seq_lens: torch.Tensor, block_size: int, scale: float, num_splits: int = 4) -> torch.Tensor:
    """q: [B, heads, head_dim] (last dim contiguous); block_table [B, max_blocks] and seq_lens [B] (>= 1)
    int tensors on q's device -> [B, heads, head_dim] in q's dtype: softmax(q k^T * scale) v over the first
    ``seq_lens[b]`` positions of sequence b, its keys/values read through its block table."""
    _check_pool(k_cache, v_cache)
    if q.stride(-1) != 1:
        q = q.contiguous()
    b, h, d = q.shape
    kvh = k_cache.shape[1]
    if h % kvh:
        raise ValueError(f"{h} query heads are not a multiple of {kvh} kv heads")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two for the Triton kernel, got {block_size}")
    g = h // kvh
    part_o = torch.empty(b * h * num_splits, d, dtype=torch.float32, device=q.device)
    part_m = torch.empty(b * h * num_splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty(b * h * num_splits, dtype=torch.float32, device=q.device)
    out = torch.empty(b, h, d, dtype=q.dtype, device=q.device)
    _decode_split_kernel[(b, kvh, num_splits)](
        q, k_cache, v_cache, block_table, seq_lens, part_o, part_m, part_l, scale, q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), block_table.stride(0), h,
        G=g, GP=_pow2(g), D=d, DP=_pow2(d), BS=block_size, S=num_splits)
    _decode_combine_kernel[(b, h)](part_o, part_m, part_l, out, out.stride(0), out.stride(1),
                                   D=d, DP=_pow2(d), S=num_splits, SP=_pow2(num_splits), H=h)
    return out
