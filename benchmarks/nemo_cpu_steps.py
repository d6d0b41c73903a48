"""Where the time goes, canary-trt against NeMo's SALM.generate: encoder, prefill and per decode step (issue 17).

    HF_HUB_OFFLINE=1 HF_HUB_CACHE=/tmp/hfcache PYTHONPATH=. /tmp/nemo-venv/bin/python benchmarks/nemo_cpu_steps.py \
        --manifest /tmp/scaled/manifest.jsonl --model /tmp/scaled/model --llm /tmp/scaled/llm --repeats 2

The same protocol as ``canary-trt bench --baseline nemo`` (runtime/bench.py: same transcribers, longest first,
warm-up, passes alternating), with timers around each stage of each side:
- canary-trt: ``encoder.encode`` (mel + encoder + projection), the decoder's ``_prefill`` and ``_decode`` (one
  decode step of the running batch: forward, greedy pick, state update);
- NeMo: ``AudioPerceptionModule.forward`` (mel + encoder + projection) and ``Qwen3ForCausalLM.forward`` inside HF
  generate, its first call per batch being the prefill and the others decode steps (HF's greedy pick and
  stopping checks between forwards are left out, so NeMo's step is if anything flattered).
Stage times are per pass (median over passes); ``ms_per_step`` is decode time / decode calls. Prints one JSON
line (appended to ``--out``). The decoder hooks name private methods of engine/backends/decoder_torch.py: if
they are renamed, this script says so instead of reporting zeros.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from runtime.bench import (_git_commit, engine_transcriber, longest_first, machine_name,  # noqa: E402
                           nemo_transcriber, read_manifest, timed_passes)


class Stages:
    """Seconds and calls per stage name, since the last ``take()``."""

    def __init__(self):
        self.seconds, self.calls = defaultdict(float), defaultdict(int)

    def wrap(self, name, fn):
        @functools.wraps(fn)  # keeps the signature: HF generate inspects forward's parameters
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0
                self.calls[name] += 1

        return timed

    def take(self) -> dict:
        out = {k: {"s": round(v, 4), "calls": self.calls[k]} for k, v in self.seconds.items()}
        self.seconds.clear()
        self.calls.clear()
        return out


def hook_engine(engine, stages: Stages) -> None:
    dec = engine.decoder
    for name in ("_prefill", "_decode"):
        if not callable(getattr(dec, name, None)):
            raise SystemExit(f"error: {type(dec).__name__} has no {name}(): update hook_engine in {__file__}")
    engine.encoder.encode = stages.wrap("encoder", engine.encoder.encode)
    dec._prefill = stages.wrap("prefill", dec._prefill)
    dec._decode = stages.wrap("decode", dec._decode)


def hook_nemo(stages: Stages) -> None:
    """Class-level timers (the model is built inside runtime.bench.nemo_transcriber); canary-trt uses neither
    class, so only NeMo's calls are counted."""
    from nemo.collections.speechlm2.modules.perception import AudioPerceptionModule
    from transformers.models.qwen3.modeling_qwen3 import Qwen3ForCausalLM

    AudioPerceptionModule.forward = stages.wrap("encoder", AudioPerceptionModule.forward)
    forward = Qwen3ForCausalLM.forward
    timed = {"prefill": stages.wrap("prefill", forward), "decode": stages.wrap("decode", forward)}

    @functools.wraps(forward)
    def llm_forward(self, input_ids=None, *args, inputs_embeds=None, **kwargs):
        # HF generate: the prompt goes in as embeddings; each decode step feeds one new token id per row
        kind = "prefill" if inputs_embeds is not None or input_ids.shape[1] > 1 else "decode"
        return timed[kind](self, input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)

    Qwen3ForCausalLM.forward = llm_forward


def staged(transcribe, stages: Stages, record: list):
    """``transcribe`` that appends the stage times of each call to ``record``."""
    def run(paths):
        stages.take()
        result = transcribe(paths)
        record.append(stages.take())
        return result

    return run


def summary(times: list[float], stage_passes: list[dict]) -> dict:
    out = {"e2e_s": round(statistics.median(times), 3), "e2e_all_s": [round(t, 3) for t in times]}
    for name in ("encoder", "prefill", "decode"):
        per_pass = [p.get(name, {"s": 0.0, "calls": 0}) for p in stage_passes]
        out[name + "_s"] = round(statistics.median(p["s"] for p in per_pass), 3)
        out[name + "_calls"] = per_pass[-1]["calls"]
    steps = [1000 * p["decode"]["s"] / p["decode"]["calls"] for p in stage_passes if p.get("decode", {}).get("calls")]
    out["ms_per_step"] = round(statistics.median(steps), 1) if steps else None
    out["ms_per_step_all"] = [round(s, 1) for s in steps]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--model", required=True, help="the model folder (NeMo finds the base LLM by its name)")
    p.add_argument("--llm", required=True, help="the base LLM folder, for canary-trt")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--out", default=None, help="append the JSON line to this file")
    args = p.parse_args(argv)

    import torch

    from runtime.engine import Engine

    load_at_start = os.getloadavg()
    items = longest_first(read_manifest(args.manifest))
    paths_audio = sum(u.duration for u in items)
    ours, theirs = Stages(), Stages()
    # NeMo and its telemetry log to stdout, which carries only the JSON line
    with contextlib.redirect_stdout(sys.stderr):
        engine = Engine.from_pretrained(model=args.model, llm=args.llm, device="cpu", dtype="float32",
                                        max_batch_size=args.max_batch_size, max_new_tokens=args.max_new_tokens)
        hook_engine(engine, ours)
        hook_nemo(theirs)
        nemo = nemo_transcriber(args.model, "cpu", torch.float32, args.max_batch_size, args.max_new_tokens)
        stage_passes = {"canary-trt": [], "nemo": []}
        transcribers = {"canary-trt": staged(engine_transcriber(engine, args.max_new_tokens), ours,
                                             stage_passes["canary-trt"]),
                        "nemo": staged(nemo, theirs, stage_passes["nemo"])}
        try:
            runs = timed_passes(transcribers, items, args.repeats, args.warmup)
        finally:
            engine.close()
    report = {"benchmark": "nemo_cpu_steps", "git_commit": _git_commit(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": args.model,
              "device": machine_name("cpu"), "precision": "float32",
              "load_average": {"start": load_at_start, "end": os.getloadavg()},
              "utterances": len(items), "audio_s": round(paths_audio, 2), "max_batch_size": args.max_batch_size,
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "warmup_utterances": args.warmup}
    for name, (times, passes) in runs.items():
        report[name] = summary(times, stage_passes[name][-args.repeats:])  # the timed passes, not the warm-up
        report[name]["tokens"] = sum(r[1] for r in passes[-1])
        report[name]["finish_reasons"] = sorted({r[2] for r in passes[-1]})
    ours_texts = [r[0] for r in runs["canary-trt"][1][-1]]
    report["nemo"]["same_text_as_canary-trt"] = sum(a == r[0] for a, r in zip(ours_texts, runs["nemo"][1][-1]))
    a, b = report["canary-trt"], report["nemo"]
    report["speedup_vs_nemo"] = {k: round(b[k] / a[k], 2) if a[k] else None
                                 for k in ("e2e_s", "encoder_s", "prefill_s", "decode_s", "ms_per_step")}
    line = json.dumps(report)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
