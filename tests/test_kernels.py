"""The Triton paged-attention kernels against the reference attention, on CPU under the Triton interpreter."""

from __future__ import annotations

import os

import pytest
import torch

from engine.kernels import paged_attention as pa

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cpu" if INTERPRET else "cuda"  # on a GPU machine the same tests run the compiled kernels
pytestmark = pytest.mark.skipif(not pa.available(), reason="triton is not installed (pip install triton)")
if pa.available() and not torch.cuda.is_available() and not INTERPRET:
    pytestmark = pytest.mark.skip(reason="no GPU and TRITON_INTERPRET is not 1")


def reference(q, k_cache, v_cache, table, lens, block_size, scale):
    """Dense attention per sequence over its slots, in float64: [B, h, hd]."""
    out = []
    q, k_cache, v_cache, table, lens = (t.cpu() for t in (q, k_cache, v_cache, table, lens))
    g = q.shape[1] // k_cache.shape[1]
    for b in range(q.shape[0]):
        n = int(lens[b])
        pos = torch.arange(n)
        slots = table[b, pos // block_size] * block_size + pos % block_size
        k = k_cache[slots].double().repeat_interleave(g, 1)  # [n, h, hd]
        v = v_cache[slots].double().repeat_interleave(g, 1)
        w = torch.softmax(torch.einsum("hd,nhd->hn", q[b].double(), k) * scale, -1)
        out.append(torch.einsum("hn,nhd->hd", w, v))
    return torch.stack(out)


def make_case(lens, kv_heads, group, head_dim, block_size, dtype, seed, padded_rows=0):
    """Random pools and block tables (blocks shuffled, block 0 reserved for scratch); padded rows point at
    block 0 with length 1, as the decoder pads a batch."""
    g = torch.Generator().manual_seed(seed)
    pages = [-(-n // block_size) for n in lens]
    num_blocks = 1 + sum(pages) + 3
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    width = max(pages) + 1
    table = torch.zeros(len(lens) + padded_rows, width, dtype=torch.long)
    at = 0
    for i, p in enumerate(pages):
        table[i, :p] = torch.tensor(perm[at : at + p])
        at += p
    shape = (num_blocks * block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(len(lens) + padded_rows, kv_heads * group, head_dim, generator=g).to(dtype)
    seq_lens = torch.tensor(list(lens) + [1] * padded_rows, dtype=torch.long)
    return tuple(t.to(DEV) for t in (q, k_cache, v_cache, table, seq_lens))


CASES = [  # (lengths, kv_heads, group, head_dim, block_size, num_splits)
    ([1], 2, 1, 16, 16, 1),
    ([1, 17, 33], 2, 2, 16, 16, 4),
    ([5, 16, 31, 64, 100], 1, 3, 32, 32, 3),
    ([2048], 1, 2, 16, 16, 4),
    ([2048, 3, 700], 1, 3, 8, 32, 8),
    ([255, 1, 1024, 77], 2, 1, 16, 32, 2),
    ([40, 9], 4, 2, 64, 16, 1),  # head_dim and groups of the real model's shape family
]


@pytest.mark.parametrize("lens,kv_heads,group,head_dim,block_size,splits", CASES)
def test_paged_decode_matches_reference(lens, kv_heads, group, head_dim, block_size, splits):
    q, kc, vc, table, seq_lens = make_case(lens, kv_heads, group, head_dim, block_size, torch.float32, 0,
                                           padded_rows=1)
    scale = head_dim**-0.5
    got = pa.paged_decode(q, kc, vc, table, seq_lens, block_size, scale, num_splits=splits)
    ref = reference(q, kc, vc, table, seq_lens, block_size, scale)
    assert got.shape == q.shape and got.dtype == q.dtype
    torch.testing.assert_close(got.double().cpu(), ref, atol=2e-5, rtol=2e-5)
    # the padded row attends to the scratch block's first slot only: its value row, exactly
    pad = got[-1].double().cpu()
    torch.testing.assert_close(pad, vc[0].double().cpu().repeat_interleave(group, 0), atol=1e-6, rtol=1e-6)


def test_paged_decode_bf16_and_split_count_changes_nothing_but_rounding():
    q, kc, vc, table, seq_lens = make_case([300, 12, 1000], 2, 2, 32, 16, torch.bfloat16, 1)
    ref = reference(q, kc, vc, table, seq_lens, 16, 32**-0.5)
    outs = [pa.paged_decode(q, kc, vc, table, seq_lens, 16, 32**-0.5, num_splits=s) for s in (1, 4)]
    for got in outs:
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.double().cpu(), ref, atol=1e-2, rtol=1e-2)
    again = pa.paged_decode(q, kc, vc, table, seq_lens, 16, 32**-0.5, num_splits=4)
    assert torch.equal(again, outs[1])  # same split count: same bits


@pytest.mark.parametrize("strided", [False, True])
def test_store_kv_writes_slots_only(strided):
    g = torch.Generator().manual_seed(2)
    kc, vc = torch.zeros(64, 3, 16, device=DEV), torch.zeros(64, 3, 16, device=DEV)
    slots = torch.tensor([5, 0, 63, 17], device=DEV)
    if strided:  # as the model hands them over: [B, kvh, 1, hd] viewed as [B, kvh, hd] of a transposed tensor
        k = torch.randn(4, 1, 3, 16, generator=g).to(DEV).transpose(1, 2)[:, :, 0]
        v = torch.randn(4, 1, 3, 16, generator=g).to(DEV).transpose(1, 2)[:, :, 0]
    else:
        k, v = torch.randn(4, 3, 16, generator=g).to(DEV), torch.randn(4, 3, 16, generator=g).to(DEV)
    pa.store_kv(k, v, kc, vc, slots)
    assert torch.equal(kc[slots], k) and torch.equal(vc[slots], v)
    rest = torch.ones(64, dtype=torch.bool, device=DEV)
    rest[slots] = False
    assert not kc[rest].any() and not vc[rest].any()


def test_errors_are_clear():
    q, kc, vc, table, seq_lens = make_case([4], 2, 2, 16, 16, torch.float32, 3)
    with pytest.raises(ValueError, match="not a multiple"):
        pa.paged_decode(q[:, :3], kc, vc, table, seq_lens, 16, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        pa.paged_decode(q, kc, vc, table, seq_lens, 12, 1.0)


# ---- fused pointwise kernels (engine/kernels/fused.py) against the torch ops of engine/llm.py ----------------

from engine.kernels import fused
from engine.llm import RMSNorm, rotate_half


# bf16 tolerances are a few ulps: besides the variance sum order, the interpreter converts fp32 -> bf16 by
# truncation where GPUs round to nearest even.


def _norm(dim, dtype, seed):
    n = RMSNorm(dim, 1e-6)
    with torch.no_grad():
        n.weight.copy_(1 + 0.1 * torch.randn(dim, generator=torch.Generator().manual_seed(seed)))
    return n.to(DEV, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_with_and_without_residual(dtype):
    g = torch.Generator().manual_seed(4)
    x, r = torch.randn(5, 96, generator=g).to(DEV, dtype), torch.randn(5, 96, generator=g).to(DEV, dtype)
    norm = _norm(96, dtype, 0)
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 4e-2}  # a few bf16 ulps
    with torch.no_grad():
        torch.testing.assert_close(fused.rmsnorm(x, norm.weight, 1e-6), norm(x), **tol)
        h, y = fused.rmsnorm(x, norm.weight, 1e-6, residual=r)
        if dtype == torch.float32:
            assert torch.equal(h, x + r)  # the residual stream is the torch add, bit for bit
        elif INTERPRET:  # the interpreter casts fp32 -> bf16 by truncation (GPUs round to nearest): an ulp
            torch.testing.assert_close(h, x + r, atol=0, rtol=2**-7)
        else:
            assert torch.equal(h, x + r)
        torch.testing.assert_close(y, norm(x + r), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_epilogue_norms_rotates_and_stores(dtype):
    h, kvh, hd, t = 4, 2, 32, 3
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(t, (h + 2 * kvh) * hd, generator=g).to(DEV, dtype)
    ang = torch.rand(t, hd // 2, generator=g) * 6
    cos, sin = torch.cat([ang, ang], -1).cos().to(DEV, dtype), torch.cat([ang, ang], -1).sin().to(DEV, dtype)
    qn, kn = _norm(hd, dtype, 1), _norm(hd, dtype, 2)
    kc, vc = torch.zeros(40, kvh, hd, dtype=dtype, device=DEV), torch.zeros(40, kvh, hd, dtype=dtype, device=DEV)
    slots = torch.tensor([7, 0, 33], device=DEV)
    with torch.no_grad():
        q = fused.qkv_epilogue(qkv, qn.weight, kn.weight, cos, sin, 1e-6, kc, vc, slots, h, kvh, hd)
        qs, ks, vs = qkv.split([h * hd, kvh * hd, kvh * hd], -1)
        qr, kr = qn(qs.view(t, h, hd)), kn(ks.view(t, kvh, hd))
        c, s = cos[:, None], sin[:, None]
        qr, kr = qr * c + rotate_half(qr) * s, kr * c + rotate_half(kr) * s
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 4e-2}
    torch.testing.assert_close(q, qr, **tol)
    torch.testing.assert_close(kc[slots], kr, **tol)
    assert torch.equal(vc[slots], vs.view(t, kvh, hd))
    assert not kc[1:7].any() and not vc[8:33].any()


def test_silu_mul():
    gu = torch.randn(3, 2 * 1500, generator=torch.Generator().manual_seed(6)).to(DEV)  # two blocks, one partial
    gate, up = gu.chunk(2, -1)
    torch.testing.assert_close(fused.silu_mul(gu), torch.nn.functional.silu(gate) * up, atol=1e-6, rtol=1e-6)


def test_kernels_compile_for_sm90_without_a_gpu():
    """Every kernel compiles to an sm90 cubin with the installed Triton (its wheel carries ptxas); in a
    subprocess, since compilation needs the kernels un-interpreted."""
    import importlib.util
    import subprocess
    import sys
    from pathlib import Path

    bin_dir = Path(importlib.util.find_spec("triton").origin).parent / "backends" / "nvidia" / "bin"
    if not (bin_dir / "ptxas").is_file():
        pytest.skip("this triton has no ptxas (CUDA backend)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "engine.kernels.compile_check", "--arch", "90"], env=env,
                       capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    assert r.stdout.count(": ok") == 7, r.stdout
