"""Soak test of the transcription server: N clients for T minutes of mixed traffic, latency and memory over time.

    python benchmarks/soak.py --clients 8 --minutes 10 --out soak.json --plot soak.png
    python benchmarks/soak.py --url http://127.0.0.1:8000 --pid 1234 --clients 32 --minutes 60 --files a.wav b.flac

Without ``--url`` the fixture model is served on 127.0.0.1 by ``canary-trt serve`` in a process of its own
(``--launch`` to serve something else), and stopped with SIGTERM at the end. Each client loops until the time
is up; its first four requests are one of each kind, then kinds are drawn (seeded) from the mix:
- ``json``: a plain transcription;
- ``stream``: streamed, read to the end (the deltas must add up to the final text);
- ``cancel``: streamed, and the connection closed after the first text delta (the server cancels it);
- ``bad``: an upload that is not audio (garbage, a WAV cut inside its header, or nothing): must be a 400.
Audio: the given files (default: the fixture utterances) plus clips made by repeating them (``--long``), so
lengths are mixed. The first answer for each file, sent alone before the clients start, is the reference that
every later answer must equal: greedy decoding gives the same text whatever the batch.

Recorded: every request's outcome and latency, errors by kind (5xx apart, text mismatches apart), latency
percentiles per time window, the server process's RSS and the engine's KV blocks in use every second, and,
once the clients have stopped and the engine is idle, its counters (from ``/ready``): KV blocks, running and
waiting sequences must all be back to zero. Output: JSON and a PNG (matplotlib) of all three over time.
"""

from __future__ import annotations

import argparse
import http.client
import io
import itertools
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks` and `runtime` importable
    sys.path.insert(0, str(ROOT))

from runtime.bench_serve import multipart, percentiles  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "tiny-canary-qwen"  # random weights; golden.json at 24 new tokens
FIXTURE_AUDIO = FIXTURE / "audio"
FIXTURE_SERVER = (f"{shlex.quote(sys.executable)} -m runtime.cli serve --model {shlex.quote(str(FIXTURE / 'model'))} "
                  f"--llm {shlex.quote(str(FIXTURE / 'llm'))} --max-new-tokens 24 --port {{port}}")
KINDS = ("json", "stream", "cancel", "bad")
MIX = (0.35, 0.35, 0.15, 0.15)  # shares of KINDS
MODEL = "canary-qwen-2.5b"


# ---- the server process -----------------------------------------------------------------------------------------

def memory_mb(pid: int | None) -> dict | None:
    """RSS and its peak (VmHWM, since start or the last reset_peak_rss) of a process in MB (Linux /proc)."""
    if pid is None:
        return None
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except OSError:
        return None
    kb = lambda key: int(fields[key].split()[0])  # noqa: E731  ("  123456 kB")
    return {"rss": round(kb("VmRSS") / 1024, 1), "peak": round(kb("VmHWM") / 1024, 1)}


def reset_peak_rss(pid: int | None) -> None:
    """Start VmHWM afresh from the current RSS (Linux >= 4.0); skipped where not allowed."""
    if pid is not None:
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
        except OSError:
            pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        return _get(url, "/health")[0] == 200
    except (OSError, http.client.HTTPException):
        return False


@dataclass
class Server:
    url: str
    pid: int | None
    command: str | None  # None: a server started elsewhere
    exit_code: int | None = None  # after SIGTERM, of a server started here (-15: drained and terminated)


def add_server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default=None, help="a running server (default: start one with --launch)")
    parser.add_argument("--pid", type=int, default=None, help="its process id, for its memory (with --url)")
    parser.add_argument("--launch", default=FIXTURE_SERVER, metavar="CMD",
                        help="command serving on 127.0.0.1:{port} (default: the fixture model)")
    parser.add_argument("--api-key", default=os.environ.get("CANARY_TRT_API_KEY"),
                        help="sent as 'Authorization: Bearer' (default: $CANARY_TRT_API_KEY)")


@contextmanager
def server_from_args(args: argparse.Namespace, start_timeout: float = 300.0):
    """A Server: the one at --url, or one started from --launch and stopped with SIGTERM on exit."""
    if args.url:
        yield Server(args.url, args.pid, None)
        return
    port = free_port()
    command = args.launch.format(port=port)
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(shlex.split(command), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    server = Server(f"http://127.0.0.1:{port}", proc.pid, command)
    try:
        deadline = time.monotonic() + start_timeout
        while not _healthy(server.url):
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"the server did not start: {command}\n{log.read()[-3000:]}")
            time.sleep(0.2)
        yield server
        proc.send_signal(signal.SIGTERM)
        server.exit_code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        log.close()


def _get(url: str, path: str, api_key: str | None = None, timeout: float = 30) -> tuple[int, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def engine_stats(url: str) -> dict | None:
    """The engine's counters from /ready (queued, waiting, running, kv_blocks_used, ...)."""
    try:
        status, body = _get(url, "/ready")
        return json.loads(body) if status == 200 else None
    except (OSError, http.client.HTTPException, ValueError):
        return None


# ---- requests ---------------------------------------------------------------------------------------------------

@dataclass
class Record:
    kind: str
    file: str
    start: float  # seconds since the soak began
    end: float
    outcome: str  # ok | cancelled | rejected | mismatch | an error kind
    ttft: float | None = None

    @property
    def error(self) -> bool:
        return self.outcome not in ("ok", "cancelled", "rejected", "mismatch")


def one_request(url: str, kind: str, name: str, data: bytes, reference: str | None, timeout: float,
                api_key: str | None) -> tuple[str, float | None]:
    """Send one request of ``kind``; returns (outcome, time to first delta). Never raises."""
    stream = kind in ("stream", "cancel")
    body, ctype = multipart({"model": MODEL, "response_format": "json", "stream": str(stream).lower()}, name, data)
    headers = {"Content-Type": ctype, **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    t0 = time.perf_counter()
    try:
        conn.request("POST", "/v1/audio/transcriptions", body, headers)
        resp = conn.getresponse()
        if kind == "bad":
            answer = json.loads(resp.read() or b"{}")
            ok = resp.status == 400 and str(answer.get("error", {}).get("message", "")).strip()
            return ("rejected" if ok else f"bad_upload_http_{resp.status}"), None
        if resp.status != 200:
            resp.read()
            return f"http_{resp.status}", None
        if not stream:
            text = json.loads(resp.read())["text"]
            return ("ok" if reference is None or text == reference else "mismatch"), None
        deltas, ttft = [], None
        for raw in resp:  # server-sent events: "data: {json}" lines
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return f"stream_error_{event['error'].get('code')}", ttft
            if event.get("type") == "transcript.text.delta":
                ttft = ttft or time.perf_counter() - t0
                if kind == "cancel":
                    return "cancelled", ttft  # closing the connection (finally) is the cancellation
                deltas.append(event["delta"])
            elif event.get("type") == "transcript.text.done":
                text = event["text"]
                right = "".join(deltas) == text and (reference is None or text == reference)
                return ("ok" if right else "mismatch"), ttft
        return "stream_incomplete", ttft
    except TimeoutError:
        return "timeout", None
    except (OSError, http.client.HTTPException, ValueError, KeyError) as e:
        return type(e).__name__, None
    finally:
        conn.close()


def bad_uploads(files: dict[str, bytes]) -> list[tuple[str, bytes]]:
    first = next(iter(files.values()))
    return [("garbage.wav", b"this is not audio " * 100), ("cut.wav", first[:40]), ("empty.wav", b"")]


def audio_files(paths: list[Path], long_seconds: list[float]) -> dict[str, bytes]:
    """name -> encoded bytes: the files, plus WAV clips of ``long_seconds`` made by repeating them in turn."""
    import numpy as np
    import soundfile as sf

    from runtime.audio import TARGET_RATE, load_audio

    files = {p.name: p.read_bytes() for p in paths}
    waves = [load_audio(p) for p in paths]
    for seconds in long_seconds:
        clip, n = [], 0
        for wave in itertools.cycle(waves):
            if n >= seconds * TARGET_RATE:
                break
            clip.append(wave)
            n += len(wave)
        buf = io.BytesIO()
        sf.write(buf, np.concatenate(clip)[: int(seconds * TARGET_RATE)], TARGET_RATE, format="WAV", subtype="PCM_16")
        files[f"clip_{seconds:g}s.wav"] = buf.getvalue()
    return files


# ---- the soak ---------------------------------------------------------------------------------------------------

def soak(url: str, files: dict[str, bytes], clients: int, seconds: float, pid: int | None = None,
         window_s: float = 10.0, seed: int = 0, timeout: float = 300.0, api_key: str | None = None) -> dict:
    """Run the soak against ``url``; returns the report (see the module docstring)."""
    references = {}
    for name, data in files.items():  # alone, before the load: the texts every later answer must equal
        body, ctype = multipart({"model": MODEL, "response_format": "json"}, name, data)
        u = urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
        conn.request("POST", "/v1/audio/transcriptions", body,
                     {"Content-Type": ctype, **({"Authorization": f"Bearer {api_key}"} if api_key else {})})
        resp = conn.getresponse()
        answer = resp.read()
        conn.close()
        if resp.status != 200:
            raise RuntimeError(f"{name}: the reference request failed with HTTP {resp.status}: {answer[:300]!r}")
        references[name] = json.loads(answer)["text"]
    bad = bad_uploads(files)
    records: list[Record] = []
    samples: list[list] = []  # [t, rss MB, kv blocks used, running sequences]
    lock = threading.Lock()
    t0 = time.perf_counter()
    stop = threading.Event()

    def client(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        for n in itertools.count():
            if time.perf_counter() - t0 >= seconds:
                return
            kind = KINDS[(n + i) % 4] if n < 4 else rng.choices(KINDS, MIX)[0]
            name, data = rng.choice(bad if kind == "bad" else list(files.items()))
            start = time.perf_counter() - t0
            outcome, ttft = one_request(url, kind, name, data, references.get(name), timeout, api_key)
            with lock:
                records.append(Record(kind, name, start, time.perf_counter() - t0, outcome, ttft))

    def sample() -> None:
        mem, stats = memory_mb(pid), engine_stats(url) or {}
        samples.append([round(time.perf_counter() - t0, 2), mem and mem["rss"], stats.get("kv_blocks_used"),
                        stats.get("running")])

    def sampler() -> None:
        while not stop.wait(1.0):
            sample()

    sample()
    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + timeout + 60)  # each client ends its last request within `timeout`
    wall = time.perf_counter() - t0
    idle, deadline = None, time.monotonic() + 60  # cancelled requests are retired at the engine's next step
    while time.monotonic() < deadline:
        idle = engine_stats(url)
        if idle and not any(idle.get(k) for k in ("running", "waiting", "queued", "kv_blocks_used")):
            break
        time.sleep(0.1)
    stop.set()
    watcher.join(30)
    sample()  # idle: the memory the server keeps
    return _report(records, samples, wall, window_s, idle, _server_metrics(url, api_key),
                   {name: len(data) for name, data in files.items()})


def _server_metrics(url: str, api_key: str | None) -> dict:
    """Finished requests by reason and errors by kind, as the server counted them (/metrics)."""
    try:
        status, body = _get(url, "/metrics", api_key)
    except (OSError, http.client.HTTPException):
        return {}
    out: dict[str, dict] = {"finished": {}, "errors": {}}
    for line in body.decode().splitlines() if status == 200 else []:
        for family, key in (("canary_requests_finished_total", "finished"), ("canary_request_errors_total", "errors")):
            if line.startswith(family + "{"):
                label = line.split('"')[1]
                out[key][label] = int(float(line.rsplit(" ", 1)[1]))
    return out


def _report(records: list[Record], samples: list, wall: float, window_s: float, idle: dict | None,
            server_metrics: dict, sizes: dict) -> dict:
    def count(key) -> dict:
        out: dict[str, int] = {}
        for r in records:
            out[key(r)] = out.get(key(r), 0) + 1
        return dict(sorted(out.items()))

    def latency(rs):
        return percentiles([r.end - r.start for r in rs if r.outcome == "ok" and r.kind in ("json", "stream")])

    windows = []
    for k in range(max(1, int(-(-wall // window_s)))):
        rs = [r for r in records if k * window_s <= r.end < (k + 1) * window_s]
        windows.append({"t0": k * window_s, "t1": min((k + 1) * window_s, round(wall, 2)), "requests": len(rs),
                        "ok": sum(r.outcome == "ok" for r in rs), "errors": sum(r.error for r in rs),
                        "latency_s": latency(rs)})
    rss = [s[1] for s in samples if s[1] is not None]
    errors = count(lambda r: r.outcome)
    errors = {k: v for k, v in errors.items() if k not in ("ok", "cancelled", "rejected", "mismatch")}
    return {"requests": len(records), "wall_s": round(wall, 1), "by_kind": count(lambda r: r.kind),
            "outcomes": count(lambda r: r.outcome if not r.error else "error"), "errors": errors,
            "http_5xx": sum(v for k, v in errors.items() if k.startswith(("http_5", "bad_upload_http_5"))),
            "mismatches": sum(r.outcome == "mismatch" for r in records),
            "latency_s": latency(records), "ttft_s": percentiles([r.ttft for r in records if r.ttft is not None]),
            # start: after the reference requests (warm); second_half_growth: the slope a leak would show
            "memory_mb": {"start": rss[0], "end": rss[-1], "max": max(rss),
                          "second_half_growth": round(rss[-1] - rss[len(rss) // 2], 1)} if rss else None,
            "idle_after": idle, "server_counted": server_metrics, "file_bytes": sizes,
            "windows": windows, "samples": {"columns": ["t_s", "rss_mb", "kv_blocks_used", "running"], "rows": samples}}


def plot(report: dict, path: str) -> None:
    """Latency percentiles per window, requests per window by outcome, server RSS and KV blocks over time."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, (lat, req, mem) = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    ws = [w for w in report["windows"] if w["latency_s"]]
    mid = [(w["t0"] + w["t1"]) / 2 for w in ws]
    for p, style in (("p50", "o-"), ("p90", "s-"), ("p99", "^-")):
        lat.plot(mid, [w["latency_s"][p] for w in ws], style, markersize=3, label=f"latency {p}")
    lat.set_ylabel("seconds")
    lat.legend(fontsize=8)
    mid = [(w["t0"] + w["t1"]) / 2 for w in report["windows"]]
    req.plot(mid, [w["requests"] for w in report["windows"]], "o-", markersize=3, label="requests ended")
    req.plot(mid, [w["errors"] for w in report["windows"]], "x-", color="red", label="errors")
    req.set_ylabel("per window")
    req.legend(fontsize=8)
    rows = report["samples"]["rows"]
    mem.plot([r[0] for r in rows if r[1] is not None], [r[1] for r in rows if r[1] is not None], label="server RSS")
    mem.set_ylabel("RSS (MB)")
    kv = mem.twinx()
    kv.plot([r[0] for r in rows if r[2] is not None], [r[2] for r in rows if r[2] is not None], color="gray",
            linewidth=0.7, label="KV blocks used")
    kv.set_ylabel("KV blocks used")
    mem.set_xlabel("seconds since start")
    for ax in (lat, req, mem):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"soak: {report.get('clients')} clients, {report['requests']} requests, "
                 f"{sum(report['errors'].values())} errors", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """0 when nothing failed: no errors, no 5xx, no text mismatches, the engine idle with no KV in use."""
    from benchmarks.common import machine_name

    parser = argparse.ArgumentParser(prog="soak.py", description=__doc__.splitlines()[0])
    add_server_arguments(parser)
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: %(default)s)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--minutes", type=float, default=None, help="how long (default: 5)")
    length.add_argument("--seconds", type=float, default=None, help="how long, in seconds")
    parser.add_argument("--files", nargs="+", type=Path, default=None, help="audio (default: the fixture utterances)")
    parser.add_argument("--long", nargs="*", type=float, default=[10.0, 20.0, 35.0], metavar="S",
                        help="also send clips of these lengths made from the files (default: %(default)s)")
    parser.add_argument("--window", type=float, default=None, help="seconds per latency window (default: T/30)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the JSON report here")
    parser.add_argument("--plot", default=None, metavar="PNG", help="plot latency, errors and memory over time here")
    args = parser.parse_args(argv)
    seconds = args.seconds if args.seconds is not None else 60 * (args.minutes or 5.0)
    files = audio_files(args.files or sorted(FIXTURE_AUDIO.glob("*.wav")), args.long)
    with server_from_args(args) as server:
        report = soak(server.url, files, args.clients, seconds, server.pid, args.window or max(1.0, seconds / 30),
                      args.seed, args.timeout, args.api_key)
    report = {"benchmark": "soak", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine_name("cpu"), "server_command": server.command or server.url, "clients": args.clients,
              "seconds": seconds, "mix": dict(zip(KINDS, MIX)), "server_exit_code": server.exit_code, **report}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.plot:
        plot(report, args.plot)
    idle = report["idle_after"] or {}
    print(f"{report['requests']} requests {report['outcomes']}, errors {report['errors']}, "
          f"{report['http_5xx']} 5xx, {report['mismatches']} mismatches; latency {report['latency_s']}; "
          f"memory {report['memory_mb']} MB; idle after: {idle}", file=sys.stderr)
    clean = idle.get("kv_blocks_used") == 0 and idle.get("running") == 0 and idle.get("waiting") == 0
    return 0 if clean and not report["errors"] and not report["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
