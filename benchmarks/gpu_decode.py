"""GPU: decode step time eager vs CUDA graphs against the weight-bandwidth floor, and end-to-end RTFx.

    python benchmarks/gpu_decode.py [--out benchmarks/results/gpu_<card>.json]   # full size, bf16, no download
    python benchmarks/gpu_decode.py --small --device cpu                      # smoke test of the script

Random weights in the release architecture (benchmarks/common.py), so nothing is downloaded; speed does not
depend on weight values. Eos is disabled and every request generates the tokens real speech of its length
would (3.7 per audio second), so the work matches transcription of read speech.

Part 1, decode step: B sequences holding --context tokens each; the mean time of one decoder step (one new
token for every sequence, the device->host copy of the tokens included), eager and replayed from a CUDA
graph, next to the floor set by reading every LLM weight once per step (plus the KV cache) at the card's
memory bandwidth.
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


def decode_step_times(model, batch_sizes, context, steps, graphs: bool) -> dict[int, float]:
    dev, bs = model.device, 16
    max_b = max(batch_sizes)
    per_seq = -(-(context + steps + 8) // bs)
    dec = TorchDecoder(model, per_seq * max_b + 1, bs, max_b, (per_seq + 1) * bs, eos_id=-1, cuda_graphs=graphs)
    alloc = BlockAllocator(per_seq * max_b + 1, bs)
    out = {}
    for b in batch_sizes:
        reqs = [DecodeRequest(i, [1, 2, 3], torch.randn(context - 5, model.cfg.llm.hidden_size, device=dev,
                                                        dtype=model.dtype), [4, 5], steps + 4, alloc.allocate(per_seq))
                for i in range(b)]
        for r in reqs:
            dec.add(r)
        dec.step()  # prefill
        for _ in range(3):
            dec.step()
        sync(dev)
        t = time.perf_counter()
        for _ in range(steps):
            dec.step()
        sync(dev)
        out[b] = (time.perf_counter() - t) / steps
        for r in reqs:
            dec.release(r.request_id)
            alloc.free(r.blocks)
    return out


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
    p.add_argument("--small", action="store_true", help="scaled-down model (smoke test)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--batch-sizes", default="1,8,32,64,128")
    p.add_argument("--context", type=int, default=300, help="tokens held per sequence (~20 s of audio + prompt)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--requests", type=int, default=512)
    p.add_argument("--max-batch-size", type=int, default=128)
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s; default: looked up by GPU name")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    salm, llm = small_dicts() if args.small else release_dicts()
    model, tok = random_model(salm, llm, dtype=dtype, device=dev)
    tok.eos_id = 10**9  # lengths come from tokens_for(); never stop early
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    bw = args.bandwidth or next((v for k, v in BANDWIDTH.items() if k in name), None)
    llm_bytes = sum(t.numel() * t.element_size() for t in model.llm.parameters()) + \
        model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()
    kv_per_token = 2 * model.cfg.llm.num_layers * model.cfg.llm.num_kv_heads * model.cfg.llm.head_dim * \
        model.embed_tokens.weight.element_size()
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    eager = decode_step_times(model, sizes, args.context, args.steps, graphs=False)
    graph = decode_step_times(model, sizes, args.context, args.steps, graphs=True) if dev.type == "cuda" else {}
    rows = []
    for b in sizes:
        floor = (llm_bytes + b * args.context * kv_per_token) / bw if bw else None
        rows.append({"batch": b, "eager_ms": round(eager[b] * 1e3, 3),
                     "graph_ms": round(graph[b] * 1e3, 3) if b in graph else None,
                     "floor_ms": round(floor * 1e3, 3) if floor else None})
    durations = speech_like_durations(args.requests if not args.small else 16, seed=1)
    enc = TorchEncoder(model.perception, max_batch=64)
    e2e = {"eager": rtfx(model, tok, enc, durations, False, args.max_batch_size)}
    if dev.type == "cuda":
        e2e["cuda_graphs"] = rtfx(model, tok, enc, durations, True, args.max_batch_size)
    report = {"benchmark": "gpu_decode", "device": name, "dtype": args.dtype, "torch": torch.__version__,
              "model": "small_dicts" if args.small else "release architecture (2.5B), random weights",
              "llm_weight_bytes": llm_bytes, "bandwidth_bytes_per_s": bw, "context_tokens": args.context,
              "decode_step": rows, "audio_s": round(sum(durations), 1), "end_to_end": e2e,
              "timed": "decode_step: one decoder step incl. the token copy to the host; end_to_end: first submit "
                       "to last result (audio decoded beforehand), longest first, 8 warm-up requests untimed"}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
            f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
