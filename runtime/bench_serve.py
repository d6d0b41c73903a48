"""Load test of an OpenAI-compatible transcription server (``canary-trt bench-serve``).

    canary-trt bench-serve --url http://127.0.0.1:8000 --files a.wav b.flac --concurrency 1 4 16 --requests 200
    canary-trt bench-serve --url http://127.0.0.1:8000 --manifest test.jsonl --rate 2 5 10 --plot load.png

Each request is ``POST /v1/audio/transcriptions`` with OpenAI's multipart form (``file``, ``model``,
``response_format=json``, and ``stream=true`` unless ``--no-stream``), the audio files taken in turn. Each load
level sends ``--requests`` requests, either
- at a fixed concurrency: that many clients, each sending its next request when the previous one answered
  (offered load = the request rate achieved), or
- as a Poisson process of ``--rate`` requests per second (exponential gaps, seeded): open-loop, so a slow
  server builds a queue instead of slowing the clients down (offered load = the rate).
Per level: latency (request sent -> last byte) p50/p90/p99, time to first token (request sent -> first
``transcript.text.delta`` event; streaming only), throughput (requests/s and audio seconds/s of the answered
requests), errors by kind (``http_<status>``, the error ``code`` of an SSE error event, or the exception).
Output: JSON (``--out``), a table on stderr, and with ``--plot`` a PNG of latency against offered load.

Only the standard library speaks HTTP here (one connection per request, like independent clients).
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import logging
import statistics
import sys
import threading
import textwrap
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

log = logging.getLogger(__name__)

MAX_THREADS = 512  # Poisson mode: requests in flight at once at most (a bound on client threads)


@dataclass
class Outcome:
    latency: float | None  # seconds, request sent -> answer complete; None if it failed
    ttft: float | None  # seconds, request sent -> first text delta (streaming only)
    error: str | None  # kind of failure, None on success
    audio_s: float


def multipart(fields: dict[str, str], file_name: str, data: bytes) -> tuple[bytes, str]:
    """An RFC 7578 multipart/form-data body with text fields and one ``file`` part; returns (body, content type)."""
    boundary = uuid.uuid4().hex
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file_name}"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def send(url: str, body: bytes, content_type: str, stream: bool, timeout: float, audio_s: float,
         api_key: str | None = None) -> Outcome:
    """One request; never raises (a failure is an Outcome with ``error``). ``api_key``: sent as a Bearer token."""
    u = urlsplit(url)
    conn_cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_cls(u.hostname, u.port, timeout=timeout)
    t0 = time.perf_counter()
    ttft = None
    try:
        headers = {"Content-Type": content_type, "Accept": "text/event-stream" if stream else "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        conn.request("POST", (u.path.rstrip("/") or "") + "/v1/audio/transcriptions", body, headers)
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return Outcome(None, None, f"http_{resp.status}", audio_s)
        if not stream:
            json.loads(resp.read())
            return Outcome(time.perf_counter() - t0, None, None, audio_s)
        done = False
        for raw in resp:  # server-sent events: "data: {json}" lines, blank lines between events
            line = raw.decode("utf-8").strip()
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            if "error" in event:
                return Outcome(None, None, str(event["error"].get("code") or "stream_error"), audio_s)
            if event.get("type") == "transcript.text.delta" and ttft is None:
                ttft = time.perf_counter() - t0
            elif event.get("type") == "transcript.text.done":
                done = True
        if not done:
            return Outcome(None, None, "stream_incomplete", audio_s)
        latency = time.perf_counter() - t0
        return Outcome(latency, latency if ttft is None else ttft, None, audio_s)  # no delta: empty text
    except (OSError, http.client.HTTPException, ValueError) as e:
        return Outcome(None, None, type(e).__name__, audio_s)
    finally:
        conn.close()


def percentiles(xs: list[float]) -> dict | None:
    if not xs:
        return None
    a = np.asarray(xs)
    return {"p50": round(float(np.percentile(a, 50)), 4), "p90": round(float(np.percentile(a, 90)), 4),
            "p99": round(float(np.percentile(a, 99)), 4), "mean": round(float(a.mean()), 4)}


def run_level(url: str, requests: list, stream: bool, timeout: float, concurrency: int | None = None,
              rate: float | None = None, seed: int = 0, api_key: str | None = None) -> dict:
    """Send every prepared request (body, content type, audio seconds) at a fixed ``concurrency`` or at Poisson
    ``rate``; returns the level's statistics."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    t0 = time.perf_counter()
    if concurrency is not None:
        next_index = itertools.count()
        lock = threading.Lock()

        def client():
            while True:
                with lock:
                    i = next(next_index)
                if i >= len(requests):
                    return
                body, ctype, audio_s = requests[i]
                outcomes[i] = send(url, body, ctype, stream, timeout, audio_s, api_key)

        threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    else:
        arrivals = np.cumsum(np.random.default_rng(seed).exponential(1 / rate, len(requests)))
        slots = threading.Semaphore(MAX_THREADS)

        def one(i):
            try:
                body, ctype, audio_s = requests[i]
                outcomes[i] = send(url, body, ctype, stream, timeout, audio_s, api_key)
            finally:
                slots.release()

        def dispatcher():
            workers = []
            for i, at in enumerate(arrivals):
                delay = t0 + at - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                slots.acquire()
                w = threading.Thread(target=one, args=(i,), daemon=True)
                w.start()
                workers.append(w)
            for w in workers:
                w.join()

        threads = [threading.Thread(target=dispatcher, daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [o for o in outcomes if o is not None and o.error is None]
    errors: dict[str, int] = {}
    for o in outcomes:
        if o is None or o.error is not None:
            kind = "not_sent" if o is None else o.error
            errors[kind] = errors.get(kind, 0) + 1
    return {"mode": "concurrency" if concurrency is not None else "poisson", "concurrency": concurrency,
            "rate_per_s": rate, "requests": len(requests), "ok": len(ok), "errors": errors,
            "wall_s": round(wall, 4),
            "offered_load_per_s": round(rate if rate is not None else len(requests) / wall, 4),
            "throughput_per_s": round(len(ok) / wall, 4),
            "audio_s_per_s": round(sum(o.audio_s for o in ok) / wall, 4),
            "latency_s": percentiles([o.latency for o in ok]),
            "ttft_s": percentiles([o.ttft for o in ok if o.ttft is not None])}


def plot(levels: list[dict], path: str, title: str) -> None:
    """Latency percentiles (and TTFT p50 when streamed) against offered load, levels joined in order of
    concurrency or rate: a closed loop's offered load is the rate it achieved, so past saturation its curve
    turns upwards instead of moving right."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    done = sorted((lv for lv in levels if lv["latency_s"]), key=lambda lv: lv["concurrency"] or lv["rate_per_s"])
    x = [lv["offered_load_per_s"] for lv in done]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for p, style in (("p50", "o-"), ("p90", "s-"), ("p99", "^-")):
        ax.plot(x, [lv["latency_s"][p] for lv in done], style, label=f"latency {p}")
    streamed = [lv for lv in done if lv["ttft_s"]]
    if streamed:
        ax.plot([lv["offered_load_per_s"] for lv in streamed], [lv["ttft_s"]["p50"] for lv in streamed], "x--",
                label="time to first token p50")
    for lv in done:
        if lv["mode"] == "concurrency":
            ax.annotate(f"c={lv['concurrency']}", (lv["offered_load_per_s"], lv["latency_s"]["p99"]),
                        textcoords="offset points", xytext=(4, 4), fontsize=8)
    closed = bool(done) and done[0]["mode"] == "concurrency"
    ax.set_xlabel("offered load (requests/s" + ("; closed loop: the rate achieved)" if closed else ", Poisson)"))
    ax.set_ylabel("seconds")
    ax.set_title(textwrap.fill(title, 90), fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line -----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``canary-trt bench-serve``."""
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default: %(default)s)")
    parser.add_argument("--files", nargs="+", default=[], metavar="FILE", help="audio files to send, in turn")
    parser.add_argument("--manifest", default=None, help="NeMo JSONL manifest whose audio files to send")
    parser.add_argument("--served-model-name", default="canary-qwen-2.5b", help="the form's `model` (%(default)s)")
    level = parser.add_mutually_exclusive_group()
    level.add_argument("--concurrency", type=int, nargs="+", metavar="N", help="closed loop: N clients per level")
    level.add_argument("--rate", type=float, nargs="+", metavar="R", help="open loop: Poisson R requests/s per level")
    parser.add_argument("--requests", type=int, default=100, help="requests per level (default: %(default)s)")
    parser.add_argument("--no-stream", action="store_true", help="plain JSON answers (no time to first token)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="Poisson arrivals (default: %(default)s)")
    parser.add_argument("--label", default=None, help="what the server runs on (GPU, backends): kept in the JSON")
    parser.add_argument("--out", default=None, metavar="FILE", help="write the JSON report here")
    parser.add_argument("--plot", default=None, metavar="PNG", help="plot latency against offered load here")
    parser.add_argument("--api-key", default=None, metavar="KEY",
                        help="the server's API key (default: $CANARY_TRT_API_KEY, as `serve` reads it)")


def _table(levels: list[dict]) -> str:
    head = f"{'level':>12} {'offered/s':>10} {'ok':>5} {'err':>4} {'req/s':>8} {'p50 s':>8} {'p90 s':>8} " \
           f"{'p99 s':>8} {'ttft p50':>9}"
    lines = [head]
    for lv in levels:
        name = f"c={lv['concurrency']}" if lv["mode"] == "concurrency" else f"rate={lv['rate_per_s']:g}"
        lat, tt = lv["latency_s"] or {}, lv["ttft_s"] or {}
        lines.append(f"{name:>12} {lv['offered_load_per_s']:>10.3f} {lv['ok']:>5} {sum(lv['errors'].values()):>4} "
                     f"{lv['throughput_per_s']:>8.3f} {lat.get('p50', float('nan')):>8.3f} "
                     f"{lat.get('p90', float('nan')):>8.3f} {lat.get('p99', float('nan')):>8.3f} "
                     f"{tt.get('p50', float('nan')):>9.3f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``canary-trt bench-serve``: 0 when every request was answered, 1 if any failed, 2 on bad arguments."""
    from runtime.bench import machine_name
    from runtime.bench import ManifestError, read_manifest
    from runtime.audio import TARGET_RATE, AudioError, load_audio

    try:
        files = [Path(f) for f in args.files] + ([u.audio for u in read_manifest(args.manifest)]
                                                  if args.manifest else [])
        if not files:
            raise ManifestError("no audio: give --files or --manifest")
        if args.requests < 1 or any(c < 1 for c in args.concurrency or []) or any(r <= 0 for r in args.rate or []):
            raise ManifestError("--requests, --concurrency and --rate must be positive")
        audio = [(f, f.read_bytes(), len(load_audio(f)) / TARGET_RATE) for f in files]
        if args.plot:
            from runtime.checks import require

            require("matplotlib", what="--plot")  # before the load test, not after it
    except (ManifestError, AudioError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import os

    from runtime.server import API_KEY_ENV

    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    stream = not args.no_stream
    fields = {"model": args.served_model_name, "response_format": "json", "stream": str(stream).lower()}
    requests = []
    for i in range(args.requests):
        f, data, seconds = audio[i % len(audio)]
        body, ctype = multipart(fields, f.name, data)
        requests.append((body, ctype, seconds))
    levels = []
    print(_table([]), file=sys.stderr)  # the header; a row as each level ends
    for c in args.concurrency or ([] if args.rate else [1]):
        levels.append(run_level(args.url, requests, stream, args.timeout, concurrency=c, api_key=api_key))
        print(_table(levels[-1:]).splitlines()[-1], file=sys.stderr)
    for r in args.rate or []:
        levels.append(run_level(args.url, requests, stream, args.timeout, rate=r, seed=args.seed,
                                api_key=api_key))
        print(_table(levels[-1:]).splitlines()[-1], file=sys.stderr)
    report = {"benchmark": "load", "url": args.url, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "client_machine": machine_name("cpu"), "server": args.label, "stream": stream,
              "files": [str(f) for f in files], "audio_s_per_request_mean": round(statistics.fmean(
                  r[2] for r in requests), 3),
              "latency": "request sent -> answer complete (last SSE event or JSON body)",
              "ttft": "request sent -> first transcript.text.delta event", "levels": levels}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    if args.plot:
        plot(levels, args.plot, f"{args.label or args.url}: {len(requests)} requests per level"
                                f"{', streamed' if stream else ''}")
    return 1 if any(lv["errors"] for lv in levels) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="canary-trt bench-serve", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
