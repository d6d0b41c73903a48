"""In-flight batching vs static batches vs one request at a time, on the CPU, in one run.

    python benchmarks/runtime_cpu.py [--requests 64] [--static-batch 8] [--out benchmarks/results/runtime_cpu.json]

A random-weight model in the release architecture, scaled down (benchmarks/common.py: small_dicts), with
the full 151,936-token vocabulary. Requests: speech-like durations (1-20 s of noise), each generating the
number of tokens real speech of that length would (3.7 per second, eos never taken), arriving as a Poisson
process whose rate is set from a measured single-request service time so that arrivals outpace a
one-at-a-time server (offered load given by --load). The three policies run on the same engine code and
weights; only how requests are handed to it differs:
- one at a time: the next request is submitted when the previous one finished;
- static batches: wait until --static-batch requests have arrived (or none are left), submit them together,
  wait for the whole batch to finish;
- in-flight: every request is submitted when it arrives and joins the running batch at the next step.
Reported per policy: makespan, throughput (requests/s, audio s/s = RTFx), latency p50/p90/p99 (finish -
arrival) and time to first token; and the ratios of in-flight throughput to the other two.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time

import numpy as np
import torch

from common import random_model, small_dicts, speech_like_durations, tokens_for

from engine.prompt import Tokenizer  # noqa: E402  (path set by common)
from engine.backends.encoder_torch import TorchEncoder  # noqa: E402
from runtime.engine import Engine, EngineOptions  # noqa: E402


def no_eos(tok: Tokenizer) -> Tokenizer:
    """Generation lengths are set per request (tokens_for): make eos unreachable (an id past the vocab)."""
    tok.eos_id = 10**9
    return tok


def percentiles(xs: list[float]) -> dict:
    a = np.asarray(xs)
    return {f"p{p}": round(float(np.percentile(a, p)), 3) for p in (50, 90, 99)}


def run(policy: str, engine: Engine, waves, max_new, arrivals, static_batch: int) -> dict:
    n = len(waves)
    handles: list = [None] * n
    submit_at = [0.0] * n
    t0 = time.perf_counter()

    def wait_until(t):
        dt = t0 + t - time.perf_counter()
        if dt > 0:
            time.sleep(dt)

    if policy == "in-flight":
        for i in range(n):
            wait_until(arrivals[i])
            submit_at[i] = time.perf_counter()
            handles[i] = engine.submit(waves[i], sample_rate=16000, max_new_tokens=max_new[i])
        for h in handles:
            h.result()
    else:
        size = 1 if policy == "one-at-a-time" else static_batch
        for start in range(0, n, size):
            idx = list(range(start, min(start + size, n)))
            wait_until(arrivals[idx[-1]])  # a static batch starts when its last member has arrived
            for i in idx:
                submit_at[i] = time.perf_counter()
                handles[i] = engine.submit(waves[i], sample_rate=16000, max_new_tokens=max_new[i])
            for i in idx:
                handles[i].result()
    makespan = time.perf_counter() - t0
    latency = [handles[i].finished_at - (t0 + arrivals[i]) for i in range(n)]
    ttft = [handles[i].first_token_at - (t0 + arrivals[i]) for i in range(n)]
    audio = sum(len(w) for w in waves) / 16000
    return {"policy": policy, "makespan_s": round(makespan, 3), "requests_per_s": round(n / makespan, 3),
            "rtfx": round(audio / makespan, 2), "latency_s": percentiles(latency), "ttft_s": percentiles(ttft),
            "tokens": sum(len(h.result().token_ids) for h in handles)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--static-batch", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--load", type=float, default=6.0, help="offered load in units of one-at-a-time capacity")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    salm, llm = small_dicts()
    model, tok = random_model(salm, llm)
    no_eos(tok)
    enc = TorchEncoder(model.perception, max_batch=64)
    durations = speech_like_durations(args.requests, args.seed)
    rng = np.random.default_rng(args.seed)
    waves = [(rng.standard_normal(int(d * 16000)) * 0.05).astype(np.float32) for d in durations]
    max_new = [tokens_for(d) for d in durations]
    opts = EngineOptions(max_batch_size=args.max_batch_size, max_seq_len=512, max_new_tokens=256)
    engine = Engine(model, tok, enc, options=opts)
    # Warm-up (untimed) and calibration: mean service time of one request alone.
    for w, m in zip(waves[:3], max_new[:3]):
        engine.submit(w, sample_rate=16000, max_new_tokens=m).result()
    t = time.perf_counter()
    for w, m in zip(waves[:4], max_new[:4]):
        engine.submit(w, sample_rate=16000, max_new_tokens=m).result()
    service = (time.perf_counter() - t) / 4
    rate = args.load / service
    arrivals = list(np.cumsum(rng.exponential(1 / rate, args.requests)) - 0.0)
    arrivals = [a - arrivals[0] for a in arrivals]
    results = [run(pol, engine, waves, max_new, arrivals, args.static_batch)
               for pol in ("one-at-a-time", "static", "in-flight")]
    engine.close()
    by = {r["policy"]: r for r in results}
    report = {
        "benchmark": "runtime_cpu", "machine": f"{platform.machine()} CPU, {args.threads} threads",
        "torch": torch.__version__, "model": "release architecture scaled down (benchmarks/common.py small_dicts), "
        "random weights, fp32", "requests": args.requests, "audio_s": round(sum(durations), 1),
        "arrival_rate_per_s": round(rate, 3), "single_request_service_s": round(service, 3),
        "static_batch": args.static_batch, "max_batch_size": args.max_batch_size,
        "timed": "submit (audio already decoded) to result: frontend, encoder, prefill, decode, detokenisation",
        "results": results,
        "in_flight_vs_one_at_a_time": round(by["in-flight"]["requests_per_s"] / by["one-at-a-time"]["requests_per_s"], 2),
        "in_flight_vs_static": round(by["in-flight"]["requests_per_s"] / by["static"]["requests_per_s"], 2),
    }
    print(f"{'policy':<15}{'makespan s':>11}{'req/s':>8}{'RTFx':>8}{'lat p50':>9}{'lat p90':>9}{'ttft p50':>9}")
    for r in results:
        print(f"{r['policy']:<15}{r['makespan_s']:>11}{r['requests_per_s']:>8}{r['rtfx']:>8}"
              f"{r['latency_s']['p50']:>9}{r['latency_s']['p90']:>9}{r['ttft_s']['p50']:>9}")
    print(f"in-flight / one-at-a-time: {report['in_flight_vs_one_at_a_time']}x; "
          f"in-flight / static: {report['in_flight_vs_static']}x")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
