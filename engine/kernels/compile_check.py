"""Compile every kernel of engine.kernels for a CUDA architecture ahead of time, without a GPU.

    python -m engine.kernels.compile_check [--arch 90]      # prints one line per kernel; exit 1 on a failure

Triton's wheel carries ptxas, so this runs on a CPU machine: it proves the kernels compile (to cubin) with the
installed Triton at the release shapes (bf16, head_dim 128, 16 query / 8 kv heads, block 16). Must run without
``TRITON_INTERPRET`` (interpreted kernels cannot be compiled); tests/test_kernels.py runs it in a subprocess.
"""

from __future__ import annotations

import argparse
import inspect
import sys


def kernel_cases() -> dict:
    """{name: (kernel, {arg: type}, {constexpr: value})} at the release model's shapes."""
    from . import fused
    from . import paged_attention as pa

    p, i, f = "*bf16", "i32", "fp32"
    norm = dict(x_ptr=p, r_ptr=p, h_ptr=p, w_ptr=p, y_ptr=p, sx=i, sr=i, sh=i, sy=i, N=i, eps=f)
    return {
        "store_kv": (pa._store_kv_kernel, dict(k_ptr=p, v_ptr=p, kc_ptr=p, vc_ptr=p, slot_ptr="*i64", skt=i, skh=i,
                                               svt=i, svh=i, scs=i, sch=i), dict(KVH=8, KVHP=8, D=128, DP=128)),
        "decode_split": (pa._decode_split_kernel,
                         dict(q_ptr=p, kc_ptr=p, vc_ptr=p, table_ptr="*i64", lens_ptr="*i64", po_ptr="*fp32",
                              pm_ptr="*fp32", pl_ptr="*fp32", scale=f, sqb=i, sqh=i, scs=i, sch=i, stb=i, H=i),
                         dict(G=2, GP=2, D=128, DP=128, BS=16, S=4)),
        "decode_combine": (pa._decode_combine_kernel, dict(po_ptr="*fp32", pm_ptr="*fp32", pl_ptr="*fp32", o_ptr=p,
                                                           sob=i, soh=i, H=i), dict(D=128, DP=128, S=4, SP=4)),
        "rmsnorm": (fused._rmsnorm_kernel, norm, dict(HAS_RES=False, BLOCK=2048)),
        "add_rmsnorm": (fused._rmsnorm_kernel, norm, dict(HAS_RES=True, BLOCK=2048)),
        "qkv_epilogue": (fused._qkv_epilogue_kernel,
                         dict(qkv_ptr=p, sqkv=i, qw_ptr=p, kw_ptr=p, cos_ptr=p, sin_ptr=p, scs=i, q_ptr=p, sqt=i,
                              sqh=i, kc_ptr=p, vc_ptr=p, scache=i, shead=i, slot_ptr="*i64", eps=f),
                         dict(H=16, KVH=8, D=128)),
        "silu_mul": (fused._silu_mul_kernel, dict(gu_ptr=p, out_ptr=p, sg=i, so=i, N=i), dict(BLOCK=1024)),
    }


def compile_all(arch: int = 90) -> dict[str, str]:
    """{kernel: "ok" | error} compiling each kernel to cubin for sm_<arch> (Triton >= 3.6 API)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    out = {}
    for name, (kernel, types, consts) in kernel_cases().items():
        params = list(inspect.signature(kernel.fn).parameters)
        sig = {a: "constexpr" if a in consts else types[a] for a in params}
        try:
            compiled = triton.compile(ASTSource(kernel, sig, constexprs={(params.index(k),): v
                                                                        for k, v in consts.items()}), target=target)
            out[name] = "ok" if "cubin" in compiled.asm else "no cubin"
        except Exception as e:  # report every kernel, not only the first failure
            out[name] = f"{type(e).__name__}: {e}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default: 90, H100/H200)")
    args = p.parse_args(argv)
    import triton

    results = compile_all(args.arch)
    for name, r in results.items():
        print(f"triton {triton.__version__} sm_{args.arch} {name}: {r}")
    return 0 if all(r == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
