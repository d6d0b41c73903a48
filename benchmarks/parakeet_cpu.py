"""Parakeet-TDT against Canary-Qwen on the same clips, on this CPU, in one run: a throughput ratio.

    python benchmarks/parakeet_cpu.py [--copies 4] [--repeats 3] [--threads 1] [--out FILE.json]
        [--nemo-python /tmp/nemo-venv/bin/python [--only-nemo] [--real-size]]

Both models go through their engines' front doors (ParakeetEngine and Engine: submit every clip, wait for
all), on the same waveforms, decoded beforehand. Two pairs:
1. ``fixtures``: the NeMo golden checkpoints tests/fixtures/tdt-tiny and tests/fixtures/tiny-canary-qwen (tiny,
   d_model 64; Canary-Qwen stops at its own end of turn or max_new_tokens). Mostly engine overhead.
2. ``cpu-scale``: both release architectures scaled down alike. One FastConformer (benchmarks/common.py
   small_dicts: 4 layers, d_model 256) in front of (a) Canary-Qwen's scaled LLM (4 layers x 256, LoRA, the full
   151,936-token vocabulary) generating 3.7 tokens per second of audio (eos never taken, as
   benchmarks/runtime_cpu.py), and (b) Parakeet-v2's full-size TDT decoder (2-layer LSTM of 640, joint 640, the
   reconstructed v2 config) with tdt-tiny's 128-piece tokenizer (joint output 134 instead of 1030). Random
   weights: Parakeet's token count is whatever random weights emit (reported).
3. ``nemo-baseline`` (with ``--nemo-python``, a Python with nemo-toolkit[asr]==3.0.0): NeMo's own
   ``transcribe`` against ParakeetEngine on the same random Parakeet weights (cpu-scale, or v2's full-size
   encoder with ``--real-size``) and the same files (benchmarks/parakeet_nemo_side.py runs the NeMo half);
   the texts and token ids of both are compared too.
Clips: the five tdt-tiny utterances (13.1 s), ``--copies`` times. Runs are interleaved (Canary, Parakeet,
Canary, ...) and the median of ``--repeats`` is reported, so both models see the same machine load.
None of this predicts the real-size ratio (the model card's ~6.5x on GPUs): the encoders here are 8x
shallower and 4x narrower than the release ones, and a GPU runs neither like a CPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

import common
from common import ROOT, machine_name, random_model, small_dicts, tokens_for

from engine.checkpoint import build_model, resolve  # noqa: E402
from engine.parakeet import load_parakeet  # noqa: E402
from runtime.audio import load_audio  # noqa: E402
from runtime.engine import Engine, EngineOptions  # noqa: E402
from runtime.parakeet import ParakeetEngine, ParakeetOptions  # noqa: E402

TDT_TINY = ROOT / "tests" / "fixtures" / "tdt-tiny"
CANARY_TINY = ROOT / "tests" / "fixtures" / "tiny-canary-qwen"
V2_CONFIG = ROOT / "tests" / "fixtures" / "parakeet-v2-config" / "model_config.yaml"


def clips(copies: int) -> list[np.ndarray]:
    waves = [load_audio(p) for p in sorted((TDT_TINY / "audio").glob("*.wav"))]
    return [w for _ in range(copies) for w in waves]


def random_parakeet(seed: int = 0, real_size: bool = False):
    """The v2 config with the small_dicts encoder (``real_size``: v2's own, 24 x 1024) and tdt-tiny's labels,
    random weights; tdt-tiny's tokenizer."""
    small = small_dicts()[0]["perception"]["encoder"]
    keys = ("n_layers", "d_model", "n_heads", "subsampling_conv_channels")
    net, tok, raw = common.random_parakeet(None if real_size else {k: small[k] for k in keys}, seed=seed)
    RANDOM_PARAKEET_CONFIG.clear()
    RANDOM_PARAKEET_CONFIG.update(raw)
    return net, tok


RANDOM_PARAKEET_CONFIG: dict = {}  # model_config.yaml of the last random_parakeet(), for the NeMo baseline


def nemo_baseline(nemo_python: str, copies: int, repeats: int, threads: int, batch: int,
                  real_size: bool = False) -> dict:
    """NeMo 3.0's ``transcribe`` (in another Python: benchmarks/parakeet_nemo_side.py) against ParakeetEngine,
    on the same random cpu-scale weights and the same files, timed alike (paths in, texts out, after a
    warm-up). Also a parity check of the 2-layer prediction network: the texts and token ids must agree."""
    import subprocess
    import tarfile
    import tempfile

    import yaml

    from engine.parakeet import checkpoint_names

    net, tok = random_parakeet(real_size=real_size)
    tmp = Path(tempfile.mkdtemp(prefix="parakeet-nemo-"))
    (tmp / "model_config.yaml").write_text(yaml.safe_dump(RANDOM_PARAKEET_CONFIG, allow_unicode=True))
    tok_dir = tmp / "tokenizer"
    tok_dir.mkdir()
    with tarfile.open(TDT_TINY / "model" / "parakeet.nemo") as t:
        for m in t.getmembers():
            for suffix in ("tokenizer.model", "vocab.txt", "tokenizer.vocab"):
                if m.name.endswith("_" + suffix):
                    (tok_dir / suffix).write_bytes(t.extractfile(m).read())
    state = net.state_dict()
    torch.save(dict(zip(checkpoint_names(net.cfg, list(state)), state.values())), tmp / "weights.pt")
    wavs = [str(p) for _ in range(copies) for p in sorted((TDT_TINY / "audio").glob("*.wav"))]
    job = {"model_config": str(tmp / "model_config.yaml"), "tokenizer_dir": str(tok_dir),
           "weights": str(tmp / "weights.pt"), "wavs": wavs, "batch_size": batch, "repeats": repeats,
           "threads": threads, "out": str(tmp / "nemo.json")}
    (tmp / "job.json").write_text(json.dumps(job))
    side = Path(__file__).resolve().parent / "parakeet_nemo_side.py"
    done = subprocess.run([nemo_python, str(side), str(tmp / "job.json")], capture_output=True, text=True,
                          timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"NeMo side failed:\n{done.stderr[-3000:]}")
    nemo = json.loads((tmp / "nemo.json").read_text())
    audio_s = sum(len(load_audio(w)) for w in wavs) / 16000
    with ParakeetEngine(net, tok, ParakeetOptions(max_batch_size=batch)) as engine:
        time_parakeet_paths(engine, wavs[:2])
        ours, results = [], None
        for _ in range(repeats):
            t, results = time_parakeet_paths(engine, wavs)
            ours.append(t)
    same_text = sum(r.text == t for r, t in zip(results, nemo["texts"]))
    same_ids = sum(r.token_ids == i for r, i in zip(results, nemo["token_ids"]))
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    out = {"pair": "nemo-baseline" + ("-real-size" if real_size else ""), "clips": len(wavs),
           "parameters": sum(p.numel() for p in net.parameters()), "audio_s": round(audio_s, 3), "batch_size": batch,
           "note": f"same random {'real-size v2 (128-piece vocabulary)' if real_size else 'cpu-scale'} Parakeet "
                   "weights in NeMo 3.0 and here; NeMo: model.transcribe(paths, "
                   "batch_size) (greedy_batch, timestamps off); here: ParakeetEngine.submit(path) for every file "
                   "(timestamps computed); both from file paths to texts",
           "nemo": {"version": nemo["nemo"], "seconds": [round(x, 4) for x in nemo["seconds"]],
                    "rtfx": round(audio_s / statistics.median(nemo["seconds"]), 2)},
           "this_engine": {"seconds": [round(x, 4) for x in ours], "rtfx": round(audio_s / statistics.median(ours), 2)},
           "texts_equal": f"{same_text}/{len(wavs)}", "token_ids_equal": f"{same_ids}/{len(wavs)}",
           "tokens": sum(len(r.token_ids) for r in results)}
    out["speedup_vs_nemo"] = round(out["this_engine"]["rtfx"] / out["nemo"]["rtfx"], 2)
    print(f"nemo-baseline: NeMo RTFx {out['nemo']['rtfx']}, this engine {out['this_engine']['rtfx']}: "
          f"{out['speedup_vs_nemo']}x; texts equal {out['texts_equal']}, token ids {out['token_ids_equal']}",
          flush=True)
    return out


def time_parakeet_paths(engine: ParakeetEngine, paths: list[str]):
    t0 = time.perf_counter()
    results = [h.result() for h in [engine.submit(p) for p in paths]]
    return time.perf_counter() - t0, results


def time_canary(engine: Engine, waves, max_new: list[int] | None) -> tuple[float, int]:
    t0 = time.perf_counter()
    handles = [engine.submit(w, 16000, max_new_tokens=None if max_new is None else max_new[i])
               for i, w in enumerate(waves)]
    tokens = sum(len(h.result().token_ids) for h in handles)
    return time.perf_counter() - t0, tokens


def time_parakeet(engine: ParakeetEngine, waves) -> tuple[float, int]:
    t0 = time.perf_counter()
    handles = [engine.submit(w, 16000) for w in waves]
    tokens = sum(len(h.result().token_ids) for h in handles)
    return time.perf_counter() - t0, tokens


def compare(name: str, canary: Engine, parakeet: ParakeetEngine, waves, max_new, repeats: int, note: str) -> dict:
    audio_s = sum(len(w) for w in waves) / 16000
    time_canary(canary, waves[:2], None if max_new is None else max_new[:2])  # warm-up (allocator, threads)
    time_parakeet(parakeet, waves[:2])
    runs = {"canary-qwen": [], "parakeet-tdt": []}
    tokens = {}
    for _ in range(repeats):
        t, tokens["canary-qwen"] = time_canary(canary, waves, max_new)
        runs["canary-qwen"].append(t)
        t, tokens["parakeet-tdt"] = time_parakeet(parakeet, waves)
        runs["parakeet-tdt"].append(t)
    out = {"pair": name, "note": note, "clips": len(waves), "audio_s": round(audio_s, 3), "models": {}}
    for model, ts in runs.items():
        med = statistics.median(ts)
        out["models"][model] = {"seconds": [round(x, 4) for x in ts], "median_s": round(med, 4),
                                "rtfx": round(audio_s / med, 2), "tokens": tokens[model],
                                "tokens_per_audio_s": round(tokens[model] / audio_s, 2)}
    out["parakeet_over_canary_throughput"] = round(
        out["models"]["parakeet-tdt"]["rtfx"] / out["models"]["canary-qwen"]["rtfx"], 2)
    print(f"{name}: Canary-Qwen RTFx {out['models']['canary-qwen']['rtfx']}, Parakeet-TDT RTFx "
          f"{out['models']['parakeet-tdt']['rtfx']}: ratio {out['parakeet_over_canary_throughput']}x", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=4, help="times the 5 clips are repeated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "parakeet_cpu.json")
    p.add_argument("--nemo-python", default=None, metavar="PYTHON",
                   help="a Python with nemo-toolkit[asr]==3.0.0: also time NeMo's transcribe on the same weights")
    p.add_argument("--only-nemo", action="store_true", help="with --nemo-python: skip the Canary-Qwen pairs")
    p.add_argument("--real-size", action="store_true",
                   help="with --nemo-python: the NeMo comparison on v2's full-size encoder (2.4 GB of weights)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    waves = clips(args.copies)
    results = []
    opts = EngineOptions(max_batch_size=args.max_batch_size)
    popts = ParakeetOptions(max_batch_size=args.max_batch_size)

    if args.nemo_python:
        results.append(nemo_baseline(args.nemo_python, args.copies, args.repeats, args.threads, args.max_batch_size,
                                     args.real_size))
    if args.only_nemo:
        return write(args, results)
    net, tok = build_model(resolve(CANARY_TINY / "model", CANARY_TINY / "llm"))
    from engine.backends.encoder_torch import TorchEncoder

    with Engine(net, tok, TorchEncoder(net.perception), options=opts) as canary, \
            ParakeetEngine(*load_parakeet(TDT_TINY / "model" / "parakeet.nemo"), popts) as parakeet:
        results.append(compare("fixtures", canary, parakeet, waves, None, args.repeats,
                               "NeMo golden tiny checkpoints (d_model 64, 2 layers); Canary stops at its own eos"))

    net, tok = random_model(*small_dicts())
    tok = copy.copy(tok)
    tok.eos_id = 10**9  # generation lengths are set per clip (tokens_for)
    max_new = [tokens_for(len(w) / 16000) for w in waves]
    with Engine(net, tok, TorchEncoder(net.perception), options=opts) as canary, \
            ParakeetEngine(*random_parakeet(), popts) as parakeet:
        results.append(compare("cpu-scale", canary, parakeet, waves, max_new, args.repeats,
                               "same small FastConformer (4 x 256); Canary's scaled LLM with the full vocabulary "
                               "vs Parakeet-v2's full-size TDT decoder; random weights"))

    return write(args, results)


def write(args, results: list[dict]) -> int:
    body = {"benchmark": "parakeet_cpu", "machine": machine_name(),
            "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
            "max_batch_size": args.max_batch_size, "repeats": args.repeats,
            "timed": "submit of every clip (audio already decoded) to the last result: frontend, encoder, decoding, "
                     "detokenisation (and TDT timestamps)",
            "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(body, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
