"""Throughput of ``transcribe-dataset`` with 1 and 2 Ray replicas, in one run, on this machine.

    python benchmarks/ray_replicas.py [--repeat 12] [--rounds 3] [--out benchmarks/results/ray_replicas_cpu.json]

The fixture model (tests/fixtures/tiny-canary-qwen, random weights, fp32, CPU) on the fixture manifest repeated
``--repeat`` times, each row with its own id. One local Ray cluster; every pass starts fresh actors (engine
load included in its wall time, as in a real job) and writes to a fresh output folder. After one untimed
warm-up job, passes alternate 1, 2, 1, 2, ... replicas (``--rounds`` of each) so that load from elsewhere on
the machine falls on both alike; each replica gets one CPU and one torch thread. Reported: per pass wall time,
files/s and RTFx, the machine's load average, and the ratio of the median 2-replica and 1-replica throughputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
TINY = ROOT / "tests" / "fixtures" / "tiny-canary-qwen"
MANIFEST = ROOT / "benchmarks" / "manifests" / "tiny_fixture.jsonl"


def corpus(folder: Path, repeat: int) -> Path:
    folder.mkdir(exist_ok=True)
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    out = folder / "manifest.jsonl"
    with out.open("w") as f:
        for k in range(repeat):
            for r in rows:
                path = (MANIFEST.parent / r["audio_filepath"]).resolve()
                f.write(json.dumps({"id": f"{k}-{path.name}", "audio_filepath": str(path)}) + "\n")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=12, help="copies of the 5-clip fixture manifest (default: 12)")
    p.add_argument("--rounds", type=int, default=3, help="passes per replica count (default: 3)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "ray_replicas_cpu.json"))
    args = p.parse_args()

    import ray
    import torch

    from runtime.dataset import transcribe_dataset

    ray.init(num_cpus=os.cpu_count() + 1, include_dashboard=False, log_to_driver=False)  # + 1 for read tasks
    engine = {"model": str(TINY / "model"), "llm": str(TINY / "llm"), "device": "cpu", "dtype": "float32",
              "encoder": "torch", "max_batch_size": 16, "max_queue": 256, "max_new_tokens": args.max_new_tokens,
              "cuda_graphs": False}
    work = Path(tempfile.mkdtemp(prefix="ray_replicas_"))
    manifest = corpus(work, args.repeat)
    passes = []
    load_before = os.getloadavg()[0]
    try:
        # untimed: the first job on a fresh cluster also starts Ray's worker processes and imports torch there
        transcribe_dataset(str(corpus(work / "warm", 1)), str(work / "warm-out"), engine, replicas=2,
                           rows_per_batch=10, progress=False)
        for i in range(2 * args.rounds):
            replicas = 1 + i % 2
            s = transcribe_dataset(str(manifest), str(work / f"out{i}"), engine, replicas=replicas,
                                   cpus_per_replica=1, rows_per_batch=10, progress=False)
            assert s.processed == s.files and s.errors == 0, s
            passes.append({"replicas": replicas, **asdict(s), "files_per_s": round(s.processed / s.wall_seconds, 3)})
            print(json.dumps(passes[-1]), file=sys.stderr)
    finally:
        shutil.rmtree(work)
        ray.shutdown()
    median = {n: statistics.median(x["files_per_s"] for x in passes if x["replicas"] == n) for n in (1, 2)}
    result = {
        "benchmark": "ray_replicas",
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} threads, shared with other work",
        "torch": torch.__version__, "ray": ray.__version__,
        "model": "tests/fixtures/tiny-canary-qwen (random weights), fp32, CPU, torch encoder",
        "files": passes[0]["files"], "audio_s": passes[0]["audio_seconds"], "rows_per_batch": 10,
        "load_average_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "timed": "whole job: reading the manifest, starting the actors (engine load), transcribing, writing parts",
        "passes": passes,
        "median_files_per_s": median,
        "throughput_ratio_2_vs_1": round(median[2] / median[1], 3),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("median_files_per_s", "throughput_ratio_2_vs_1")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
