"""Offline-workload simulation on CPU: how the engine admits, encodes and prefills a long offline run.

    python benchmarks/offline_sim.py --json [--utterances 512] [--batches 64 128 256] [--out FILE]

It drives the real scheduler and engine (``threaded=False``, one ``step()`` at a time) with the tiny fixture
model: 512 utterances of synthetic audio with LibriSpeech-like durations (1-35 s, mean about 7.4 s), all
submitted at once, in arrival (FIFO) order and longest first, at several batch limits. Each request generates
about 3.7 tokens per second of audio (end of turn is never produced, so lengths do not depend on the random
weights). What it counts, per configuration:
- ``admit_step_fraction``: engine steps that admitted requests / all steps (each stalls the running streams
  for an encoder + prefill pass);
- ``mean_encoder_batch``: clips per encoder batch (the backend's padded batches);
- ``prefill_padding``: padding tokens / all tokens of the prefill batches;
- ``prefill_shapes`` / ``encoder_shapes``: distinct prefill and encoder batch shapes (each new shape costs a
  kernel plan or a graph on a GPU).
Shapes and counts do not depend on the machine; the run takes a few minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import librispeech_durations, tokens_for  # noqa: E402

from engine.checkpoint import build_model, resolve  # noqa: E402
from runtime.engine import Engine  # noqa: E402
try:
    from runtime.options import EngineOptions  # noqa: E402
except ImportError:  # the engine before runtime/options.py existed (for the 'before' numbers)
    from runtime.engine import EngineOptions  # noqa: E402

TINY = ROOT / "tests" / "fixtures" / "tiny-canary-qwen"
SR = 16000


class Counters:
    """Wraps the engine's stages to count what they were given (works on any version of the engine)."""

    def __init__(self, engine: Engine):
        self.steps = self.admit_steps = 0
        self.encoder: list[tuple[int, int]] = []  # (clips, samples) per encoder batch
        self.prefill: list[tuple[int, int, int]] = []  # (rows, padded length, real tokens) per prefill batch
        run, schedule = engine.encoder._run, engine.scheduler.schedule

        def counted_run(audio, lengths):
            self.encoder.append(tuple(audio.shape))
            return run(audio, lengths)

        def counted_schedule():
            admitted = schedule()
            self.admit_steps += bool(admitted)
            return admitted

        engine.encoder._run = counted_run
        engine.scheduler.schedule = counted_schedule
        dec = engine.decoder
        if not hasattr(dec, "prefill_log"):  # an engine whose decoder keeps no prefill log: wrap _prefill
            prefill = dec._prefill

            def counted_prefill(reqs):
                lens = [r.prompt_len for r in reqs]
                self.prefill.append((len(lens), max(lens), sum(lens)))
                return prefill(reqs)

            dec._prefill = counted_prefill
        self.decoder = dec

    def prefill_batches(self) -> list[tuple[int, int, int]]:
        return list(self.decoder.prefill_log) if hasattr(self.decoder, "prefill_log") else self.prefill


def simulate(model, tok, durations: list[float], max_batch: int, order: str, seed: int = 0) -> dict:
    from engine.backends.encoder_torch import TorchEncoder

    opts = EngineOptions(max_batch_size=max_batch, max_seq_len=1024, max_queue=len(durations) + 1)
    encoder = TorchEncoder(model.perception, getattr(opts, "encoder_batch_size", 16))
    engine = Engine(model, tok, encoder, options=opts, threaded=False)
    counters = Counters(engine)
    idx = list(range(len(durations)))
    if order == "longest_first":
        idx.sort(key=lambda i: -durations[i])
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for i in idx:
        wave = (rng.standard_normal(int(durations[i] * SR)) * 0.05).astype(np.float32)
        engine.submit(wave, sample_rate=SR, max_new_tokens=tokens_for(durations[i]))
    while engine._inbox or not engine.scheduler.idle:
        engine.step()
        counters.steps += 1
    pre = counters.prefill_batches()
    padded = sum(rows * n for rows, n, _ in pre)
    real = sum(t for *_, t in pre)
    return {"max_batch": max_batch, "order": order, "utterances": len(durations), "steps": counters.steps,
            "admit_step_fraction": round(counters.admit_steps / counters.steps, 4),
            "mean_encoder_batch": round(float(np.mean([b for b, _ in counters.encoder])), 2),
            "encoder_batches": len(counters.encoder),
            "prefill_padding": round((padded - real) / padded, 4), "prefill_batches": len(pre),
            "prefill_shapes": len({(rows, n) for rows, n, _ in pre}),
            "encoder_shapes": len(set(counters.encoder)), "wall_s": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--utterances", type=int, default=512)
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--orders", nargs="+", default=["fifo", "longest_first"], choices=["fifo", "longest_first"])
    p.add_argument("--json", action="store_true", help="print one JSON object {rows: [...]} on stdout")
    p.add_argument("--out", default=None, help="also write the JSON object to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    files = resolve(TINY / "model", TINY / "llm")
    model, tok = build_model(files)
    tok.eos_id = -1  # never end of turn: every request generates its own number of tokens
    durations = librispeech_durations(args.utterances)
    rows = []
    for b in args.batches:
        for order in args.orders:
            rows.append(simulate(model, tok, durations, b, order))
            print(json.dumps(rows[-1]), file=sys.stderr)
    report = {"benchmark": "offline_sim", "model": "tiny-canary-qwen fixture (CPU)",
              "mean_duration_s": round(float(np.mean(durations)), 2), "rows": rows}
    if args.json:
        print(json.dumps(report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
