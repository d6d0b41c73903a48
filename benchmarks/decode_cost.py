"""Cost of one decode step outside the GEMMs: host time per sequence, kernel launches per layer, graph count.

    python benchmarks/decode_cost.py --json                       # this code
    python benchmarks/decode_cost.py --json --rev c2ba643         # the decoder of an older commit (before)
    python benchmarks/decode_cost.py --json --cpu-step c2ba643    # + CPU decode step time, old vs new

- ``host_us_per_seq``: wall time of ``TorchDecoder.step()`` per running sequence at batch 128, with the
  device part of the step (what a CUDA graph replays: embedding, layers, LM head, sampling) replaced by a
  stub that only writes the step's tokens. What is left is the host's work: bookkeeping, copies, reading
  the tokens back and building the result dicts. CPU, scaled model (benchmarks/common.py small_dicts).
- ``launches_per_layer``: kernel launches per decoder layer in one decode step of the fast path, counted
  with a dispatch mode (every aten op that is not a view or an allocation launches one kernel on CUDA; each
  Triton kernel launch counts one; Triton runs under ``TRITON_INTERPRET=1`` on CPU). Per layer = count with
  two layers minus count with one.
- ``graphs``: decode graphs the batch ladder captures at max_batch_size 128 and 256.
- ``--cpu-step OLD_REV``: mean decode step (real forward) of OLD_REV's decoder (on the unfused layers)
  against this one, same run, alternating passes, fp32, 2 threads, batch 16, 150 tokens of context, at the
  release widths with 4 LLM layers (``--width small``: small_dicts): the same-run ratio is the number.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU: the Triton kernels run under the interpreter

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from common import ROOT, random_model, release_dicts, small_dicts  # noqa: E402

from engine.backends import decoder_torch  # noqa: E402
from engine.backends.base import DecodeRequest  # noqa: E402
from engine.kernels import fused, paged_attention  # noqa: E402

BS = 16
NOT_LAUNCHES = {"empty", "empty_strided", "empty_like", "new_empty", "detach", "lift_fresh", "alias",
                "_local_scalar_dense", "set_", "resize_", "_unsafe_view", "scalar_tensor"}  # no kernel


def old_decoder_module(rev: str):
    """engine/backends/decoder_torch.py as of ``rev``, importable beside the current one."""
    src = subprocess.run(["git", "show", f"{rev}:engine/backends/decoder_torch.py"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout
    src = src.replace("from .base import", "from engine.backends.base import")
    path = Path("/tmp") / f"decoder_torch_{rev}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"decoder_torch_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


class LaunchCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n, self.paused, self.ops = 0, False, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and not func.is_view and name not in NOT_LAUNCHES:
            self.n += 1
            self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


class _Launch:
    """Stands in for a Triton kernel: ``kernel[grid](...)`` counts one launch; the interpreter's own tensor
    traffic inside it is not counted."""

    def __init__(self, kernel, counter: LaunchCounter):
        self.kernel, self.counter = kernel, counter

    def __getitem__(self, grid):
        def run(*a, **kw):
            c = self.counter
            c.n += 1
            c.ops["triton"] = c.ops.get("triton", 0) + 1
            c.paused = True
            try:
                return self.kernel[grid](*a, **kw)
            finally:
                c.paused = False
        return run


def count_triton(counter: LaunchCounter) -> dict:
    """Wrap every Triton kernel of engine.kernels; returns the originals to put back."""
    originals = {(m, n): getattr(m, n) for m in (paged_attention, fused) for n in dir(m) if n.endswith("_kernel")}
    for (m, n), k in originals.items():
        setattr(m, n, _Launch(k, counter))
    return originals


def requests(model, b, prompt, max_new, first_block=1):
    per = -(-(prompt + max_new) // BS)
    h = model.cfg.llm.hidden_size
    return [DecodeRequest(i, [1, 2, 3], torch.randn(prompt - 5, h, dtype=model.dtype) * 0.1, [4, 5], max_new,
                          list(range(first_block + i * per, first_block + (i + 1) * per))) for i in range(b)]


def make(mod, model, b, prompt, max_new, **kw):
    per = -(-(prompt + max_new) // BS)
    dec = mod.TorchDecoder(model, b * per + 1, BS, b, per * BS, eos_id=-1, cuda_graphs=False, **kw)
    for r in requests(model, b, prompt, max_new):
        dec.add(r)
    dec.step()  # prefill (real forward)
    return dec


def launches(mod, layers: int, new: bool) -> tuple[int, dict]:
    salm, llm = small_dicts()
    llm.update(num_hidden_layers=layers, vocab_size=512)
    model, _ = random_model(salm, llm, dtype=torch.bfloat16)  # the fast path's dtype
    kw = {"fast": True} if new else {}
    dec = make(mod, model, 2, 40, 8, **kw)
    counter = LaunchCounter()
    originals = count_triton(counter)
    try:
        with torch.no_grad(), counter:  # (inference_mode hides some casts from dispatch modes)
            if new:
                dec._decode_fast(2)
            else:
                dec._decode_forward(2, 4)
    finally:
        for (mod, name), k in originals.items():
            setattr(mod, name, k)
    return counter.n, counter.ops


def launches_per_layer(mod, new: bool) -> int:
    return launches(mod, 2, new)[0] - launches(mod, 1, new)[0]


def host_us_per_seq(mod, new: bool, b: int = 128, steps: int = 20, trials_n: int = 5) -> float:
    salm, llm = small_dicts()
    model, _ = random_model(salm, llm)
    dec = make(mod, model, b, 100, steps * trials_n + 20)
    if new:
        def stub(*_):  # the device part: write the step's tokens, as the graph would
            dec._report[0, : dec.n] = 7
            dec._report[1, : dec.n] = -0.5
            dec._report[2, : dec.n] = 0
        dec._decode_fast = dec._decode_reference = stub
    else:
        def stub(B, nb):
            dec._out[:B] = 7
        dec._decode_forward = stub
    for _ in range(3):
        dec.step()
    trials = []
    for _ in range(trials_n):  # the median of several trials: this CPU is shared
        t = time.perf_counter()
        for _ in range(steps):
            out = dec.step()
        trials.append((time.perf_counter() - t) / steps / b * 1e6)
        assert len(out) == b
    return sorted(trials)[len(trials) // 2]


class unfused:
    """The model's layers without their fused projections for a while (the old decoder's view of it); the
    checkpoint weights are views into the fused tensors, so nothing is copied."""

    def __init__(self, model):
        self.layers = model.llm.layers

    def __enter__(self):
        self.saved = [(l.self_attn._qkv, l.mlp._gate_up) for l in self.layers]
        for l in self.layers:
            l.self_attn._qkv = l.mlp._gate_up = None

    def __exit__(self, *exc):
        for l, (qkv, gu) in zip(self.layers, self.saved):
            l.self_attn._qkv, l.mlp._gate_up = qkv, gu


def cpu_step_ms(old, width: str = "release", passes: int = 3, b: int = 16, steps: int = 8, context: int = 150) -> dict:
    """Decode step time (real forward) of the old and the new decoder on one model, alternating passes.
    ``width``: "release" (release widths, 4 LLM layers, LoRA r=128 on q/v: the model of the NeMo comparison)
    or "small" (small_dicts)."""
    salm, llm = small_dicts() if width == "small" else release_dicts()
    if width != "small":
        llm.update(num_hidden_layers=4)
        salm["perception"]["encoder"].update(n_layers=1)  # the encoder plays no part here
    model = random_model(salm, llm)[0]
    model.llm.fuse()
    times = {"old": [], "new": []}  # every step's time: on a shared CPU the minimum and quartile are robust
    for _ in range(passes):
        for k in ("old", "new"):
            with unfused(model) if k == "old" else nullcontext():
                dec = make(old if k == "old" else decoder_torch, model, b, context, steps * 2 + 4)
                dec.step()
                for _ in range(steps):
                    t = time.perf_counter()
                    dec.step()
                    times[k].append((time.perf_counter() - t) * 1e3)
            del dec
    stats = {k: {"min_ms": round(min(v), 1), "p25_ms": round(sorted(v)[len(v) // 4], 1),
                 "median_ms": round(sorted(v)[len(v) // 2], 1)} for k, v in times.items()}
    return {"model": f"{width} widths, {model.cfg.llm.num_layers} LLM layers, vocab {model.cfg.llm.vocab_size}, fp32",
            "batch": b, "context": context, "threads": torch.get_num_threads(), "steps_per_decoder": len(times["old"]),
            "old": stats["old"], "new": stats["new"],
            "speedup_min": round(stats["old"]["min_ms"] / stats["new"]["min_ms"], 3),
            "speedup_median": round(stats["old"]["median_ms"] / stats["new"]["median_ms"], 3)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rev", default=None, help="measure the decoder of this git revision instead")
    p.add_argument("--cpu-step", metavar="OLD_REV", default=None,
                   help="also time the CPU decode step of OLD_REV's decoder against this one")
    p.add_argument("--width", choices=["release", "small"], default="release", help="model of --cpu-step")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    new = args.rev is None
    mod = decoder_torch if new else old_decoder_module(args.rev)
    report = {"code": "working tree" if new else args.rev, "machine": platform.processor() or "CPU",
              "torch": torch.__version__,
              "host_us_per_seq": round(host_us_per_seq(mod, new), 2),
              "launches_per_layer": launches_per_layer(mod, new),
              "launch_ops_one_layer": launches(mod, 1, new)[1],
              "graphs": {"128": len(mod.ladder(128)) * (1 if new else len(_old_rungs(mod, 128))),
                         "256": len(mod.ladder(256)) * (1 if new else len(_old_rungs(mod, 256)))},
              "fast_path": "Triton paged attention (interpreter on CPU)" if new else "gather + SDPA"}
    if args.cpu_step:
        report["cpu_decode_step"] = cpu_step_ms(old_decoder_module(args.cpu_step), args.width)
    print(json.dumps(report) if args.json else json.dumps(report, indent=1))
    return 0


def _old_rungs(mod, max_batch: int, max_seq_len: int = 1024) -> list[int]:
    """Length rungs of the old decoder (one graph per batch x length rung) at the engine's default
    max_seq_len and block size."""
    max_blocks = -(-max_seq_len // BS)
    return sorted({min(2**i, max_blocks) for i in range(max_blocks.bit_length() + 1)})


if __name__ == "__main__":
    sys.exit(main())
