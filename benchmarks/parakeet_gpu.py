"""Parakeet-TDT speed at the v2 size on a GPU: benchmarks/gpu_check.py's "parakeet" part.

    python benchmarks/parakeet_gpu.py [--small]        # prints the JSON report

RTFx of the v2 architecture (random weights, benchmarks/common.py) at max batch 64/128/256, single-stream
latency, and graphs vs eager tokens. No download.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import numpy as np
import torch

from common import random_parakeet

from runtime.audio import TARGET_RATE  # noqa: E402
from runtime.common import Transcription, pick_dtype  # noqa: E402
from runtime.parakeet import ParakeetEngine, ParakeetOptions  # noqa: E402


def benchmark(device: str | torch.device = "cuda", small: bool = False, batches: tuple[int, ...] = (64, 128, 256),
              utterances: int = 512, seed: int = 0) -> dict:
    """RTFx of the v2-size model (random weights, bf16 encoder on GPUs) at each max batch size on LibriSpeech-like
    durations (log-normal, 1-35 s, mean about 7.4 s; noise), CUDA graphs on; single-stream latency of one 10 s
    utterance; and whether graphs and eager decoding give the same tokens. Timed from submit (waveforms in
    memory) to the last result, after an untimed warm-up of each configuration. ``small``: a CPU smoke test."""
    dev = torch.device(device)
    dtype = pick_dtype(None, dev)
    net, tok, _ = random_parakeet({"n_layers": 2, "d_model": 128, "n_heads": 4, "subsampling_conv_channels": 64}
                                  if small else None, device=dev, dtype=dtype)
    rng = np.random.default_rng(seed)
    n = 12 if small else utterances
    if small:
        batches = (4, 8)
    mu = math.log(7.4) - 0.6**2 / 2
    durations = np.clip(np.exp(rng.normal(mu, 0.6, n)), 1.0, 3.0 if small else 35.0)
    waves = [(rng.standard_normal(int(d * TARGET_RATE)) * 0.1).astype(np.float32) for d in durations]
    audio_s = float(sum(len(w) for w in waves) / TARGET_RATE)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    def run(engine: ParakeetEngine, items) -> tuple[float, list[Transcription]]:
        sync()
        t0 = time.perf_counter()
        results = [h.result() for h in [engine.submit(w, TARGET_RATE) for w in items]]
        sync()
        return time.perf_counter() - t0, results

    report: dict = {"model": f"Parakeet-TDT v2 architecture{' (small)' if small else ''}, random weights, "
                             f"{len(tok.pieces)}-piece vocabulary",
                    "parameters": sum(p.numel() for p in net.parameters()), "device": str(dev),
                    "encoder_dtype": str(dtype).removeprefix("torch."), "utterances": n,
                    "audio_s": round(audio_s, 2), "rows": []}
    for b in batches:
        opts = ParakeetOptions(max_batch_size=b, max_queue=n + b, max_batch_seconds=40.0 * b)
        with ParakeetEngine(net, tok, opts) as engine:
            run(engine, waves[: 2 * b])  # warm-up: allocator, cuBLAS, graph capture
            seconds, results = run(engine, waves)
        report["rows"].append({"max_batch_size": b, "seconds": round(seconds, 3), "rtfx": round(audio_s / seconds, 1),
                               "tokens": sum(len(r.token_ids) for r in results)})
    ten = (rng.standard_normal((3 if small else 10) * TARGET_RATE) * 0.1).astype(np.float32)
    with ParakeetEngine(net, tok, ParakeetOptions(max_batch_size=1)) as engine:
        run(engine, [ten])
        lat = sorted(run(engine, [ten])[0] for _ in range(5))
    report["single_stream"] = {"audio_s": len(ten) / TARGET_RATE, "latency_s_median": round(lat[2], 4),
                               "latency_s_max": round(lat[-1], 4)}
    sample = waves[:16]
    with ParakeetEngine(net, tok, ParakeetOptions(max_batch_size=len(sample), cuda_graphs=True)) as graphed, \
            ParakeetEngine(net, tok, ParakeetOptions(max_batch_size=len(sample), cuda_graphs=False)) as eager:
        a, b = run(graphed, sample)[1], run(eager, sample)[1]
    report["graphs_vs_eager"] = {"cuda_graphs": graphed.decoder.cuda_graphs,
                                 "same_tokens": f"{sum(x.token_ids == y.token_ids for x, y in zip(a, b))}/{len(a)}"}
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="a small model on the CPU (smoke test)")
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    print(json.dumps(benchmark(args.device or ("cpu" if args.small else "cuda"), args.small), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
