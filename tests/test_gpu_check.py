"""``benchmarks/gpu_check.py --small``: the one GPU check runs end to end on the CPU (CI smoke test), its
exactness part really compares with NeMo's goldens, and every part lands in the JSON report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_small_runs_on_cpu_and_reports_every_part(tmp_path):
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    for key in ("exact_fp32", "graphs_vs_eager_fixture", "precision", "cuda_settings", "decode_step", "offline",
                "single_stream", "tensorrt", "trtllm", "parakeet"):
        assert key in report, key
        assert "error" not in report[key], (key, report[key].get("error"), report[key].get("traceback"))
    assert report["exact_fp32"]["ok"] is True and report["exact_fp32"]["eager"]["utterances"] == 5
    assert report["precision"]["float32"]["greedy_ids_matching_prefix"].split("/")[0] == \
        report["precision"]["float32"]["greedy_ids_matching_prefix"].split("/")[1]
    rows = report["offline"]["rows"]
    assert {r["order"] for r in rows} == {"longest_first", "arrival"}
    for r in rows:
        assert r["rtfx"] > 0 and r["tokens"] > 0
        st = r["stages_synced"]
        assert st["encoder_s"] > 0 and st["decode_s"] > 0 and st["total_s"] >= st["encoder_s"] + st["decode_s"]
    assert report["single_stream"]["latency_s_median"] >= report["single_stream"]["ttft_s_median"] > 0
    assert "skipped" in report["tensorrt"] and "skipped" in report["trtllm"]
    assert "gpu_check on" in proc.stderr  # the human table


def test_gpu_check_exactness_part_fails_on_a_wrong_golden(monkeypatch):
    """The exactness check is a real comparison: one changed golden id makes it report the clip."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import gpu_check

    real = gpu_check.golden_ids()
    stem = next(iter(real))
    monkeypatch.setattr(gpu_check, "golden_ids", lambda: {**real, stem: real[stem][:-1] + [real[stem][-1] + 1]})
    import torch

    r = gpu_check.exact_fp32(torch.device("cpu"))
    assert r["ok"] is False and r["eager"]["mismatched"] == [stem]
