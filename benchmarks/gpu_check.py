"""The one GPU check: exactness, graphs, precision drift and speed, in one call, one JSON file and a table.

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check_<card>.json     # on the GPU, < 8 min
    python benchmarks/gpu_check.py --small --out /tmp/gpu_check_small.json             # CPU smoke test (CI)

Needs no download: the exactness parts run the NeMo-golden fixture (tests/fixtures/tiny-canary-qwen), the
speed parts random weights in the release architecture (benchmarks/common.py). Parts:
1. ``exact_fp32``: fp32 greedy ids of the fixture through the engine, on the device, TF32 off (the engine's
   CUDA settings), against NeMo's goldens; eager and CUDA graphs.
2. ``graphs_vs_eager``: the fixture in bf16, and the release-size model, decoded with and without graphs:
   identical tokens.
3. ``precision``: fp32 and bf16 against NeMo's goldens (benchmarks/precision.py): logit error, id agreement.
4. ``cuda_settings``: the SDPA backends and TF32 flags the engine chose.
5. ``decode_step``: benchmarks/gpu_decode.py's decode-step times at batch 1/64/128/256 next to the floor.
6. ``offline``: RTFx of the release-size model in bf16 at max batch 64, 128 and 256 on 512 synthetic
   LibriSpeech-like utterances (1-35 s, mean about 7.4 s, written as WAV files and read inside the timer),
   longest first and in arrival order, timed by ``canary-trt bench``'s protocol (runtime/bench.py:
   warm-up untimed, median of repeats); then one more pass with a device sync after each stage for the
   per-stage breakdown (encoder, prefill, decode, host) and peak memory; the KV pool size.
7. ``single_stream``: latency and time to first token of one 10 s utterance, alone.
8. ``tensorrt`` / ``trtllm``: run where installed, else marked skipped with the reason.
9. ``parakeet``: Parakeet-TDT at the v2 size, random weights: RTFx at batch 64/128/256 and single-stream
   latency (benchmarks/parakeet_gpu.py).
Each part that fails records its error and the script goes on; the exit code is 1 if any exactness check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import librispeech_durations, random_model, release_dicts, small_dicts, tokens_for  # noqa: E402

from engine.backends.encoder_torch import TorchEncoder  # noqa: E402
from engine.checkpoint import build_model, resolve  # noqa: E402
from runtime import bench  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.options import EngineOptions  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "tiny-canary-qwen"
SR = 16000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cuda_settings(device: torch.device, dtype: torch.dtype) -> dict:
    """What the engine sets for correctness on CUDA (TF32, SDPA backends), as it reports it."""
    try:
        from engine.backends.cuda_settings import configure
    except ImportError:
        return {"skipped": "engine.backends.cuda_settings is not in this tree"}
    return configure(device, dtype)


OUT: Path | None = None  # --out: rewritten after every part, so a run cut short still leaves what it measured


def part(report: dict, name: str, fn, *args, **kw):
    """Run one part; record its result or its error, never stop the script."""
    t = time.perf_counter()
    try:
        report[name] = fn(*args, **kw)
    except Exception as e:  # noqa: BLE001  (a GPU check reports every failure and goes on)
        report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(limit=6)}
    if isinstance(report[name], dict):
        report[name]["part_seconds"] = round(time.perf_counter() - t, 2)
    print(f"[gpu_check] {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if OUT is not None:
        OUT.write_text(json.dumps(report, indent=1) + "\n")


# ---- 1-3: exactness on the fixture ------------------------------------------------------------------------------

def golden_ids() -> dict[str, list[int]]:
    from safetensors.torch import load_file

    meta = json.loads((FIXTURE / "golden.json").read_text())
    g = load_file(str(FIXTURE / "golden.safetensors"))
    out = {}
    for a in meta["audio_files"]:
        s = a["stem"]
        ids = g[f"single.{s}.gen_ids"].tolist()
        out[s] = ids[:-1] if meta["per_utterance"][s]["single"]["eos_produced"] else ids
    return out


def fixture_ids(device: torch.device, dtype: torch.dtype, graphs: bool, repeat: int = 2) -> dict[str, list[int]]:
    files = resolve(FIXTURE / "model", FIXTURE / "llm")
    model, tok = build_model(files, dtype=dtype, device=device)
    meta = json.loads((FIXTURE / "golden.json").read_text())
    stems = [a["stem"] for a in meta["audio_files"]]
    opts = EngineOptions(max_batch_size=4, cuda_graphs=graphs, max_new_tokens=int(meta["generation"]["max_new_tokens"]))
    with Engine(model, tok, TorchEncoder(model.perception, 64), options=opts) as engine:
        handles = [(s, engine.submit(FIXTURE / "audio" / f"{s}.wav")) for s in stems * repeat]
        got: dict[str, list[int]] = {}
        for s, h in handles:
            ids = h.result(300).token_ids
            if got.setdefault(s, ids) != ids:
                raise AssertionError(f"{s}: two runs of the same clip gave different ids")
    return got


def exact_fp32(device: torch.device) -> dict:
    ref = golden_ids()
    out = {"tf32": cuda_settings(device, torch.float32)}
    for graphs in ([False, True] if device.type == "cuda" else [False]):
        got = fixture_ids(device, torch.float32, graphs)
        bad = [s for s in ref if got[s] != ref[s]]
        out["graphs" if graphs else "eager"] = {"ids_equal_nemo": not bad, "utterances": len(ref), "mismatched": bad}
    out["ok"] = all(v["ids_equal_nemo"] for k, v in out.items() if k in ("eager", "graphs"))
    return out


def graphs_vs_eager_fixture(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    eager = fixture_ids(device, torch.bfloat16, graphs=False)
    graph = fixture_ids(device, torch.bfloat16, graphs=True)
    return {"identical_tokens": eager == graph, "utterances": len(eager)}


def precision(device: torch.device) -> dict:
    from precision import measure

    out = {name: measure(FIXTURE, dt, str(device)) for name, dt in (("float32", torch.float32),
                                                                    ("bfloat16", torch.bfloat16))}
    out["bf16_vs_fp32"] = {"logit_rel_error": out["bfloat16"]["teacher_forced_logits"]["rel"],
                           "greedy_ids_matching_prefix": out["bfloat16"]["greedy_ids_matching_prefix"]}
    return out


# ---- 5: decode step -------------------------------------------------------------------------------------------

def decode_step(model, small: bool) -> dict:
    import gpu_decode

    sizes = [1, 4] if small else [1, 64, 128, 256]
    return gpu_decode.decode_report(model, sizes, context=64 if small else 300, steps=5 if small else 30)


# ---- 6-7: offline RTFx and single-stream latency --------------------------------------------------------------

def write_clips(durations: list[float], folder: Path) -> list[bench.Utterance]:
    """Noise clips as 16-bit WAV files (read back inside the timer, as the leaderboard reads its files)."""
    rng = np.random.default_rng(0)
    items = []
    for i, d in enumerate(durations):
        path = folder / f"clip{i:04d}.wav"
        sf.write(str(path), (rng.standard_normal(int(d * SR)) * 0.05).astype(np.float32), SR, subtype="PCM_16")
        items.append(bench.Utterance(path, d, None))
    return items


def transcriber(engine: Engine, tokens: dict[Path, int]):
    """``canary-trt bench``'s transcriber contract; each clip generates what speech of its length would."""
    def transcribe(paths):
        handles = [engine.submit(p, max_new_tokens=tokens[p]) for p in paths]
        return [(r.text, len(r.token_ids), r.finish_reason, r.duration) for r in (h.result() for h in handles)]

    return transcribe


class StageTimer:
    """Wraps the engine's stages with a device sync on each side, for a per-stage breakdown of one pass."""

    def __init__(self, engine: Engine):
        self.seconds = {"encoder": 0.0, "prefill": 0.0, "decoder_step": 0.0}
        dev = engine.model.device
        dec = engine.decoder

        def timed(key, fn):
            def run(*a, **kw):
                sync(dev)
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    sync(dev)
                    self.seconds[key] += time.perf_counter() - t
            return run

        self._restore = [(engine.encoder, "encode", engine.encoder.encode), (dec, "step", dec.step)]
        engine.encoder.encode = timed("encoder", engine.encoder.encode)
        dec.step = timed("decoder_step", dec.step)
        if hasattr(dec, "_prefill"):
            self._restore.append((dec, "_prefill", dec._prefill))
            dec._prefill = timed("prefill", dec._prefill)

    def close(self) -> None:
        for obj, name, fn in self._restore:
            setattr(obj, name, fn)

    def breakdown(self, total: float) -> dict:
        s = self.seconds
        return {"encoder_s": round(s["encoder"], 3), "prefill_s": round(s["prefill"], 3),
                "decode_s": round(s["decoder_step"] - s["prefill"], 3),
                "host_s": round(total - s["encoder"] - s["decoder_step"], 3), "total_s": round(total, 3)}


def offline(model, tok, items: list[bench.Utterance], batches: list[int], repeats: int, graphs: bool) -> dict:
    dev = model.device
    tokens = {u.audio: tokens_for(u.duration) for u in items}
    audio_s = sum(u.duration for u in items)
    rows, kv = [], {}
    for b in batches:
        opts = EngineOptions(max_batch_size=b, cuda_graphs=graphs, max_queue=len(items) + 8)
        engine = Engine(model, tok, TorchEncoder(model.perception, opts.encoder_batch_size), options=opts)
        run = None
        try:
            kv[b] = {"tokens": engine.allocator.capacity * engine.allocator.block_size,
                     "blocks": engine.allocator.capacity,
                     "graphs": len(getattr(engine.decoder, "graphs", {}) or {})}
            run = transcriber(engine, tokens)
            for order in ("longest_first", "arrival"):
                seq = bench.longest_first(items) if order == "longest_first" else list(items)
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                # warm-up: 16 clips (graphs are captured when the engine is built; this is allocator and kernels)
                passes = bench.timed_passes({"canary-trt": run}, seq, repeats, warmup=min(len(seq), 16))
                times, results = passes["canary-trt"]
                summary = bench.summarise(f"synthetic-{order}", "synthetic", seq, times, results)
                stages = StageTimer(engine)
                t0 = time.perf_counter()
                run([u.audio for u in seq])
                total = time.perf_counter() - t0
                stages.close()
                rows.append({"max_batch": b, "order": order, "rtfx": summary["rtfx"],
                             "time_s": summary["time_s"], "tokens": summary["tokens"],
                             "stages_synced": stages.breakdown(total),
                             "peak_memory_gb": round(torch.cuda.max_memory_allocated(dev) / 2**30, 2)
                             if dev.type == "cuda" else None})
                print(f"[gpu_check] offline b={b} {order}: RTFx {summary['rtfx']}", file=sys.stderr)
        finally:
            engine.close()
            del engine, run  # the transcriber holds the engine: drop both, or its KV pool stays allocated
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return {"utterances": len(items), "audio_s": round(audio_s, 1), "rows": rows, "kv_pool": kv,
            "timed": bench.TIMED + "; stages_synced: one extra pass with a device sync around each stage"}


def single_stream(model, tok, graphs: bool, seconds: float = 10.0, runs: int = 5) -> dict:
    wave = (np.random.default_rng(1).standard_normal(int(seconds * SR)) * 0.05).astype(np.float32)
    lat, ttft = [], []
    with Engine(model, tok, TorchEncoder(model.perception, 64),
                options=EngineOptions(max_batch_size=8, cuda_graphs=graphs)) as engine:
        engine.submit(wave, sample_rate=SR, max_new_tokens=tokens_for(seconds)).result()  # warm-up
        for _ in range(runs):
            h = engine.submit(wave, sample_rate=SR, max_new_tokens=tokens_for(seconds))
            h.result()
            lat.append(h.finished_at - h.submitted_at)
            ttft.append(h.first_token_at - h.submitted_at)
    return {"audio_s": seconds, "new_tokens": tokens_for(seconds), "latency_s_median": round(statistics.median(lat), 4),
            "latency_s_min": round(min(lat), 4), "ttft_s_median": round(statistics.median(ttft), 4),
            "note": "submit of decoded samples to result; median of 5 after a warm-up"}


# ---- 8-9: optional stages -----------------------------------------------------------------------------------------

def optional_stacks() -> dict:
    out = {}
    for name, module, needs in (("tensorrt", "tensorrt", "TensorRT plans: build/build_encoder_engine.py, then "
                                 "`pytest -m tensorrt`"),
                                ("trtllm", "tensorrt_llm", "TensorRT-LLM 1.0-1.2 engine: build/build_decoder.py, then "
                                 "`pytest -m trtllm`")):
        if importlib.util.find_spec(module) is None:
            out[name] = {"skipped": f"{module} is not installed on this machine ({needs})"}
        else:
            out[name] = {"skipped": f"{module} is installed, but this check builds no plans/engines (needs model "
                                    f"artifacts): run {needs}"}
    return out


def parakeet(device: torch.device, small: bool) -> dict:
    from parakeet_gpu import benchmark

    return benchmark(device=device, small=small)


# ---- main -----------------------------------------------------------------------------------------------------

def table(report: dict) -> str:
    lines = [f"gpu_check on {report['device']} ({report['torch']})"]
    for key in ("exact_fp32", "graphs_vs_eager_fixture"):
        v = report.get(key, {})
        lines.append(f"  {key}: " + ("ok" if v.get("ok", v.get("identical_tokens")) else
                                      v.get("skipped") or v.get("error") or "FAILED"))
    for r in report.get("decode_step", {}).get("rows", []):
        lines.append(f"  decode batch {r.get('batch')}: eager {r.get('eager_ms')} ms, graph {r.get('graph_ms')} ms, "
                     f"floor {r.get('floor_ms')} ms")
    for r in report.get("offline", {}).get("rows", []):
        lines.append(f"  offline max_batch {r['max_batch']:>3} {r['order']:<13}: RTFx {r['rtfx']:>8}  "
                     f"stages {r['stages_synced']}  peak {r['peak_memory_gb']} GB")
    s = report.get("single_stream", {})
    if "latency_s_median" in s:
        lines.append(f"  single stream {s['audio_s']} s: latency {s['latency_s_median']} s, TTFT {s['ttft_s_median']} s")
    for key in ("tensorrt", "trtllm", "parakeet"):
        v = report.get(key, {})
        lines.append(f"  {key}: {v.get('skipped') or v.get('error') or 'ran'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="scaled-down model and workload on the CPU (CI smoke test)")
    p.add_argument("--device", default=None, help="default: cuda, or cpu with --small")
    p.add_argument("--utterances", type=int, default=None, help="offline utterances (default 512; --small: 8)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed passes per configuration (default 1; one more, synced, gives the stage breakdown)")
    p.add_argument("--out", default=None, help="the JSON report (rewritten after every part)")
    args = p.parse_args(argv)
    global OUT
    OUT = Path(args.out) if args.out else None
    dev = torch.device(args.device or ("cpu" if args.small else "cuda"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device here (use --small for the CPU smoke test)", file=sys.stderr)
        return 2
    if dev.type == "cpu":
        torch.set_num_threads(min(torch.get_num_threads(), 2))
    report: dict = {"benchmark": "gpu_check", "device": bench.machine_name(dev), "torch": torch.__version__,
                    "small": args.small, "git_commit": bench._git_commit(),
                    "triton": (importlib.util.find_spec("triton") is not None)
                    and __import__("triton").__version__}
    t0 = time.perf_counter()
    part(report, "exact_fp32", exact_fp32, dev)
    part(report, "graphs_vs_eager_fixture", graphs_vs_eager_fixture, dev)
    part(report, "precision", precision, dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    part(report, "cuda_settings", cuda_settings, dev, dtype)
    salm, llm = small_dicts() if args.small else release_dicts()
    model, tok = random_model(salm, llm, dtype=dtype, device=dev)
    tok.eos_id = -1  # never end of turn: each request generates its tokens_for(duration)
    part(report, "decode_step", decode_step, model, args.small)
    n = args.utterances or (8 if args.small else 512)
    batches = [4] if args.small else [64, 128, 256]
    with tempfile.TemporaryDirectory() as tmp:
        durations = librispeech_durations(n) if not args.small else [min(d, 4.0) for d in librispeech_durations(n)]
        items = write_clips(durations, Path(tmp))
        part(report, "offline", offline, model, tok, items, batches, args.repeats or 1,
             graphs=dev.type == "cuda")
    part(report, "single_stream", single_stream, model, tok, dev.type == "cuda", 3.0 if args.small else 10.0,
         2 if args.small else 5)
    del model
    report.update(optional_stacks())
    part(report, "parakeet", parakeet, dev, args.small)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    print(table(report), file=sys.stderr)
    exact = report.get("exact_fp32", {}).get("ok") is True
    graphs = report.get("graphs_vs_eager_fixture", {})
    return 0 if exact and graphs.get("identical_tokens", True) and "error" not in graphs else 1


if __name__ == "__main__":
    sys.exit(main())
