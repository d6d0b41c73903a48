"""The short CI run of benchmarks/soak.py against a live fixture server: mixed traffic from concurrent clients
(plain, streamed, cancelled mid-stream, bad uploads) for a few seconds ends with no errors, every answer equal to
its reference, the engine idle with no KV memory in use, and the report and plot written."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("fastapi", reason="needs the serving extra")
pytest.importorskip("matplotlib", reason="the soak plots with matplotlib")

from benchmarks import soak  # noqa: E402
from serving_helpers import LiveServer, build_engine  # noqa: E402
from runtime.server import ServerSettings  # noqa: E402


def test_short_soak(tmp_path):
    server = LiveServer(build_engine(max_batch_size=8), ServerSettings())
    out, png = tmp_path / "soak.json", tmp_path / "soak.png"
    try:
        rc = soak.main(["--url", server.url, "--pid", str(os.getpid()), "--clients", "4", "--seconds", "5",
                        "--long", "12", "--window", "1", "--out", str(out), "--plot", str(png)])
    finally:
        server.stop()
    report = json.loads(out.read_text())
    assert rc == 0
    assert report["errors"] == {} and report["http_5xx"] == 0 and report["mismatches"] == 0
    assert set(report["by_kind"]) == set(soak.KINDS)  # each client's first four requests cover the mix
    assert report["outcomes"]["rejected"] == report["by_kind"]["bad"]
    assert report["outcomes"]["ok"] >= report["by_kind"]["json"] + report["by_kind"]["stream"]
    idle = report["idle_after"]
    assert idle["kv_blocks_used"] == 0 and idle["running"] == 0 and idle["waiting"] == 0 and idle["queued"] == 0
    assert sum(report["server_counted"]["finished"].values()) > 0  # /metrics was read back
    assert report["memory_mb"]["start"] > 0 and len(report["samples"]["rows"]) >= 3
    assert report["latency_s"]["p50"] <= report["latency_s"]["p99"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
