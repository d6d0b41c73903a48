"""GPU: decode step time eager vs CUDA graphs against the weight-bandwidth floor, and end-to-end RTFx.

    python benchmarks/gpu_decode.py [--out benchmarks/results/gpu_decode_<card>.json]   # release size, bf16
    python benchmarks/gpu_decode.py --small                                            # CPU smoke test

Importable (benchmarks/gpu_check.py reuses it): ``decode_report(model, batch_sizes, context, steps)``,
``decode_step_times(model, batch_sizes, context, steps, graphs)``, ``measure_bandwidth(device)``.

Random weights in the release architecture (benchmarks/common.py), so nothing is downloaded; speed does not
depend on weight values. Eos is disabled and every request generates the tokens real speech of its length
would (3.7 per audio second), so the work matches transcription of read speech.

Part 1, decode step: B sequences (batch 1, 64, 128, 256) holding --context tokens each; the mean time of one
decoder step (one new token for every sequence, the tokens read back one step behind), eager and replayed
from CUDA graphs, next to the floor: every LLM weight plus the live KV cache read once per step at the
measured device copy bandwidth; eager and graph tokens compared.
Part 2, RTFx: --requests utterances of speech-like durations (1-20 s), all submitted at once (offline, as
the Open ASR Leaderboard measures), timed from the first submit to the last result: frontend, encoder,
prefill, decode, detokenisation. Eager vs CUDA graphs, same engine otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from common import random_model, release_dicts, small_dicts, speech_like_durations, tokens_for

from engine.backends.base import DecodeRequest  # noqa: E402
from engine.backends.decoder_torch import TorchDecoder  # noqa: E402
from engine.backends.encoder_torch import TorchEncoder  # noqa: E402
from runtime.engine import Engine, EngineOptions  # noqa: E402
from runtime.scheduler import BlockAllocator  # noqa: E402

# Peak memory bandwidth (bytes/s) by device name, for the floor. --bandwidth overrides.
BANDWIDTH = {"H200": 4.8e12, "H100 80GB HBM3": 3.35e12, "H100 PCIe": 2.0e12, "H100 NVL": 3.9e12,
             "A100-SXM4-80GB": 2.04e12, "A100-SXM4-40GB": 1.56e12, "L40S": 0.864e12}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 10) -> float | None:
    """Device copy bandwidth (bytes read + written per second) of a large device-to-device copy; None on CPU."""
    if device.type != "cuda":
        return None
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        y.copy_(x)
    end.record()
    end.synchronize()
    return 2 * nbytes * reps / (start.elapsed_time(end) / 1e3)


def decode_step_times(model, batch_sizes, context: int = 300, steps: int = 30, graphs: bool = True,
                      block_size: int = 16) -> dict[int, dict]:
    """{batch: {"step_ms": mean decoder step, "tokens": every token delivered}} for B sequences holding
    ``context`` tokens each (random audio embeddings, eos disabled); one decoder for all batch sizes,
    sized for the largest; ``graphs``: CUDA graphs (ignored off CUDA)."""
    dev = model.device
    max_b = max(batch_sizes)
    per_seq = -(-(context + steps + 8) // block_size)
    dec = TorchDecoder(model, per_seq * max_b + 1, block_size, max_b, (per_seq + 1) * block_size, eos_id=-1,
                       cuda_graphs=graphs)
    alloc = BlockAllocator(per_seq * max_b + 1, block_size)
    g = torch.Generator().manual_seed(0)
    out = {}
    for b in batch_sizes:
        reqs = [DecodeRequest(i, [1, 2, 3], (torch.randn(context - 5, model.cfg.llm.hidden_size, generator=g) * 0.5)
                              .to(dev, model.dtype), [4, 5], steps + 6, alloc.allocate(per_seq)) for i in range(b)]
        for r in reqs:
            dec.add(r)
        tokens = []
        for _ in range(4):  # prefill, then warm-up steps
            tokens.append(sorted(dec.step().items()))
        sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            tokens.append(sorted(dec.step().items()))
        sync(dev)
        out[b] = {"step_ms": (time.perf_counter() - t) / steps * 1e3, "tokens": tokens, "fast": dec.fast,
                  "graphs": len(dec.graphs)}
        for r in reqs:
            dec.release(r.request_id)
            alloc.free(r.blocks)
        dec.step()  # drop the report still in flight
    del dec
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def weight_bytes(model) -> int:
    """Bytes one decode step must read: every LLM weight once (the tied LM head is the embedding)."""
    return sum(t.numel() * t.element_size() for t in model.llm.parameters()) + \
        model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()


def decode_report(model, batch_sizes, context: int = 300, steps: int = 30, bandwidth: float | None = None) -> dict:
    """Decode step eager and with CUDA graphs at each batch size, next to the floor: (weights + live KV) /
    the measured device copy bandwidth. ``tokens_identical``: graphs and eager delivered the same tokens."""
    dev = model.device
    bw = bandwidth or measure_bandwidth(dev)
    cfg = model.cfg.llm
    kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.embed_tokens.weight.element_size()
    eager = decode_step_times(model, batch_sizes, context, steps, graphs=False)
    graph = decode_step_times(model, batch_sizes, context, steps, graphs=True) if dev.type == "cuda" else {}
    wbytes = weight_bytes(model)
    rows = []
    for b in batch_sizes:
        live = b * (context + steps // 2) * kv_per_token  # the mean context over the timed steps
        floor = (wbytes + live) / bw * 1e3 if bw else None
        row = {"batch": b, "eager_ms": round(eager[b]["step_ms"], 3), "floor_ms": round(floor, 3) if floor else None,
               "graph_ms": round(graph[b]["step_ms"], 3) if b in graph else None}
        best = row["graph_ms"] or row["eager_ms"]
        row["floor_fraction"] = round(floor / best, 3) if floor else None
        row["tokens_identical"] = eager[b]["tokens"] == graph[b]["tokens"] if b in graph else None
        rows.append(row)
    first = eager[batch_sizes[0]]
    return {"rows": rows, "attention": "triton paged" if first["fast"] else "torch SDPA (reference path)",
            "graphs_captured": graph[batch_sizes[0]]["graphs"] if graph else 0, "bandwidth_bytes_per_s": bw,
            "weight_bytes": wbytes, "kv_bytes_per_token": kv_per_token,
            "context_tokens": context, "steps": steps, "dtype": str(model.dtype).replace("torch.", ""),
            "timed": "one decoder step (all sequences one token; reports read one step behind on CUDA), mean "
                     "over the timed steps after a prefill and 3 warm-up steps",
            "floor": "(LLM weights + live KV at the mean context) / measured device-to-device copy bandwidth"}


def rtfx(model, tok, enc, durations, graphs: bool, max_batch: int) -> dict:
    rng = np.random.default_rng(0)
    waves = [(rng.standard_normal(int(d * 16000)) * 0.05).astype(np.float32) for d in durations]
    order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))  # longest first, as the leaderboard
    engine = Engine(model, tok, enc, options=EngineOptions(max_batch_size=max_batch, cuda_graphs=graphs,
                                                           max_prefill_tokens=16384))
    for i in order[:8]:  # warm-up, untimed
        engine.submit(waves[i], sample_rate=16000, max_new_tokens=tokens_for(durations[i])).result()
    sync(model.device)
    steps0, t = engine.steps, time.perf_counter()
    handles = [engine.submit(waves[i], sample_rate=16000, max_new_tokens=tokens_for(durations[i])) for i in order]
    tokens = sum(len(h.result().token_ids) for h in handles)
    elapsed = time.perf_counter() - t
    engine.close()
    return {"rtfx": round(sum(durations) / elapsed, 1), "seconds": round(elapsed, 3), "tokens": tokens,
            "steps": engine.steps - steps0}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="scaled-down model on the CPU, in seconds (smoke test)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --small)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                   help="default: bfloat16 (float32 with --small: bf16 is slow on CPUs)")
    p.add_argument("--batch-sizes", default=None, help="default: 1,64,128,256 (1,4 with --small)")
    p.add_argument("--context", type=int, default=None, help="tokens held per sequence (default 300: ~20 s of "
                   "audio + prompt; 64 with --small)")
    p.add_argument("--steps", type=int, default=None, help="timed decode steps (default 30; 5 with --small)")
    p.add_argument("--requests", type=int, default=None, help="end-to-end utterances (default 256; 8 with "
                   "--small; 0: skip the end-to-end part)")
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s for the floor; default: measured")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    small = args.small
    dev = torch.device(args.device or ("cpu" if small else "cuda"))
    args.dtype = args.dtype or ("float32" if small else "bfloat16")
    dtype = getattr(torch, args.dtype)
    sizes = [int(b) for b in (args.batch_sizes or ("1,4" if small else "1,64,128,256")).split(",")]
    context = args.context or (64 if small else 300)
    steps = args.steps or (5 if small else 30)
    requests = args.requests if args.requests is not None else (8 if small else 256)
    salm, llm = small_dicts() if small else release_dicts()
    model, tok = random_model(salm, llm, dtype=dtype, device=dev)
    tok.eos_id = 10**9  # lengths come from tokens_for(); never stop early
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    t0 = time.perf_counter()
    step = decode_report(model, sizes, context, steps, bandwidth=args.bandwidth)
    step["peak_bandwidth_spec"] = next((v for k, v in BANDWIDTH.items() if k in name), None)
    e2e = {}
    if requests:
        durations = speech_like_durations(requests, seed=1)
        enc = TorchEncoder(model.perception, max_batch=64)
        e2e = {"audio_s": round(sum(durations), 1), "requests": requests,
               "eager": rtfx(model, tok, enc, durations, False, args.max_batch_size)}
        if dev.type == "cuda":
            e2e["cuda_graphs"] = rtfx(model, tok, enc, durations, True, args.max_batch_size)
    report = {"benchmark": "gpu_decode", "device": name, "dtype": args.dtype, "torch": torch.__version__,
              "model": "small_dicts" if small else "release architecture (2.5B), random weights",
              "decode_step": step, "end_to_end": e2e, "seconds": round(time.perf_counter() - t0, 1),
              "timed": "end_to_end: first submit to last result (audio decoded beforehand), longest first, "
                       "8 warm-up requests untimed"}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
