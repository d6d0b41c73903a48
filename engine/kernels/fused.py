"""Fused pointwise kernels of the decode step (Triton): RMSNorm with the residual add, the q/k RMSNorm + RoPE +
K/V store epilogue of the QKV GEMM, and SiLU(gate) * up. Each replaces a chain of 5-26 torch kernels with one.

Numerics follow the torch reference ops (engine/llm.py) step by step: statistics in float32, and every
intermediate the reference rounds to the model dtype (normalised value, RoPE products, SiLU) is rounded here
too, so the results differ from the torch ops only by the order of the variance sum. In float32 the
roundings are no-ops, and on CPU the kernels run under ``TRITON_INTERPRET=1`` (tests/test_kernels.py).
"""

from __future__ import annotations

import torch

from .paged_attention import _pow2, triton

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _rmsnorm_kernel(x_ptr, r_ptr, h_ptr, w_ptr, y_ptr, sx, sr, sh, sy, N, eps,
                        HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        m = c < N
        x = tl.load(x_ptr + row * sx + c, mask=m, other=0.0)
        dt = x.dtype
        if HAS_RES:  # h = x + residual, rounded as torch's add, and written out: the new residual stream
            x = (x.to(tl.float32) + tl.load(r_ptr + row * sr + c, mask=m, other=0.0).to(tl.float32)).to(dt)
            tl.store(h_ptr + row * sh + c, x, mask=m)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / N + eps)
        y = (xf * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + c, mask=m, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * sy + c, y.to(y_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _head_norm_rope(base, w_ptr, cos, sin, d, eps, D: tl.constexpr):
        """One head [D] at ``base``: RMSNorm (weight w), then neox RoPE, roundings as the torch ops."""
        half = D // 2
        dp = (d + half) % D  # rotate_half partner
        x = tl.load(base + d)
        dt = x.dtype
        xp = tl.load(base + dp)
        xf = x.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
        n = ((xf * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + d).to(tl.float32)).to(dt).to(tl.float32)
        np_ = ((xp.to(tl.float32) * rstd).to(dt).to(tl.float32) * tl.load(w_ptr + dp).to(tl.float32))
        np_ = np_.to(dt).to(tl.float32)
        rot = tl.where(d < half, -np_, np_)
        a = (n * cos).to(dt).to(tl.float32)
        b = (rot * sin).to(dt).to(tl.float32)
        return (a + b).to(dt)

    @triton.jit
    def _qkv_epilogue_kernel(qkv_ptr, sqkv, qw_ptr, kw_ptr, cos_ptr, sin_ptr, scs, q_ptr, sqt, sqh,
                             kc_ptr, vc_ptr, scache, shead, slot_ptr, eps,
                             H: tl.constexpr, KVH: tl.constexpr, D: tl.constexpr):
        t = tl.program_id(0)
        j = tl.program_id(1)  # 0..H-1: query heads; H..H+KVH-1: kv heads
        d = tl.arange(0, D)
        dt = cos_ptr.dtype.element_ty
        cos = tl.load(cos_ptr + t * scs + d).to(dt).to(tl.float32)
        sin = tl.load(sin_ptr + t * scs + d).to(dt).to(tl.float32)
        base = qkv_ptr + t * sqkv
        if j < H:
            q = _head_norm_rope(base + j * D, qw_ptr, cos, sin, d, eps, D)
            tl.store(q_ptr + t * sqt + j * sqh + d, q)
        else:
            kh = j - H
            k = _head_norm_rope(base + (H + kh) * D, kw_ptr, cos, sin, d, eps, D)
            slot = tl.load(slot_ptr + t).to(tl.int64)
            tl.store(kc_ptr + slot * scache + kh * shead + d, k)
            tl.store(vc_ptr + slot * scache + kh * shead + d, tl.load(base + (H + KVH + kh) * D + d))

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, sg, so, N, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < N
        g = tl.load(gu_ptr + row * sg + c, mask=m, other=0.0)
        dt = g.dtype
        u = tl.load(gu_ptr + row * sg + N + c, mask=m, other=0.0).to(tl.float32)
        gf = g.to(tl.float32)
        s = (gf / (1.0 + tl.exp(-gf))).to(dt).to(tl.float32)
        tl.store(out_ptr + row * so + c, (s * u).to(dt), mask=m)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """x [T, N] (rows contiguous) -> RMSNorm(x) * weight; with ``residual``: (h, RMSNorm(h) * weight) where
    h = x + residual. One launch."""
    t, n = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x) if residual is not None else x
    r = residual if residual is not None else x
    _rmsnorm_kernel[(t,)](x, r, h, weight, y, x.stride(0), r.stride(0), h.stride(0), y.stride(0), n, eps,
                          HAS_RES=residual is not None, BLOCK=_pow2(n))
    return (h, y) if residual is not None else y


def qkv_epilogue(qkv: torch.Tensor, q_weight, k_weight, cos, sin, eps: float, k_cache, v_cache, slots,
                 heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv [T, (heads + 2 kv_heads) * head_dim] (one token per row), cos/sin [T, head_dim] -> q [T, heads,
    head_dim] normalised and rotated; k (normalised, rotated) and v are stored in the pools at ``slots``."""
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two for the fused epilogue, got {head_dim}")
    t = qkv.shape[0]
    q = torch.empty(t, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    _qkv_epilogue_kernel[(t, heads + kv_heads)](
        qkv, qkv.stride(0), q_weight, k_weight, cos, sin, cos.stride(0), q, q.stride(0), q.stride(1),
        k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), slots, eps, H=heads, KVH=kv_heads, D=head_dim)
    return q


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 N] (gate | up) -> SiLU(gate) * up [T, N]."""
    t, n2 = gate_up.shape
    n = n2 // 2
    out = torch.empty(t, n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, _pow2(n))
    _silu_mul_kernel[(t, triton.cdiv(n, block))](gate_up, out, gate_up.stride(0), out.stride(0), n, BLOCK=block)
    return out
