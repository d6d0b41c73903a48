"""The fixture engine for the server and Triton tests, a live uvicorn server in a thread, and audio makers.

Also run as a script (``python serving_helpers.py PORT``) to serve the fixture model in a process of its own,
for the SIGTERM test, and imported by Triton's Python stub through the ``engine_factory`` parameter.
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script or inside Triton's stub

from conftest import FIXTURES, Golden  # noqa: E402
from test_engine import _TorchEncoder  # noqa: E402  (the encoder stand-in until engine.backends.encoder lands)

TINY = Golden(FIXTURES / "tiny-canary-qwen")
GATE_ENV = "CANARY_TEST_GATE"  # a file path: while it exists, encoding waits (holds requests in flight)


class GatedEncoder:
    """The torch encoder, held while ``gate`` is clear or the file named by $CANARY_TEST_GATE exists, so a test
    can keep requests in flight for as long as it needs without depending on timing. Waits at most 120 s."""

    name = "torch"

    def __init__(self, inner):
        self.inner = inner
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set by every call: a test can tell the engine is inside the encoder

    def encode(self, audio):
        self.entered.set()
        deadline = time.monotonic() + 120
        path = os.environ.get(GATE_ENV)
        while time.monotonic() < deadline and (not self.gate.is_set() or (path and os.path.exists(path))):
            time.sleep(0.01)
        return self.inner.encode(audio)


def build_engine(**options):
    """The fixture model on CPU behind a GatedEncoder; ``options``: EngineOptions fields."""
    from engine.checkpoint import build_model, resolve
    from runtime.engine import Engine, EngineOptions

    model, tok = build_model(resolve(TINY.root / "model", TINY.root / "llm"))
    options.setdefault("max_new_tokens", TINY.max_new_tokens)
    return Engine(model, tok, GatedEncoder(_TorchEncoder(model)), options=EngineOptions(**options))


def engine_factory(**kwargs):
    """Triton's ``engine_factory`` hook: the same Engine.from_pretrained keywords, on the fixture model."""
    keep = {"max_batch_size", "max_queue", "max_seq_len", "max_new_tokens", "kv_cache_tokens"}
    return build_engine(**{k: v for k, v in kwargs.items() if k in keep and v is not None})


def build_parakeet(**options):
    """tdt-tiny's Parakeet-TDT on CPU, threaded; ``options``: ParakeetOptions fields."""
    from test_parakeet import NEMO

    from runtime.parakeet import ParakeetEngine

    return ParakeetEngine.from_pretrained(NEMO, device="cpu", **options)


def golden_text(stem: str) -> str:
    return TINY.meta["per_utterance"][stem]["single"]["text"].strip()


def encode_audio(wave: np.ndarray, rate: int, fmt: str, codec: str, out_rate: int) -> bytes:
    """Encode mono float32 audio with FFmpeg through PyAV (m4a/aac, webm/opus: what libsndfile cannot write)."""
    import av
    import soxr

    data = soxr.resample(wave, rate, out_rate).astype(np.float32) if out_rate != rate else wave
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream(codec, rate=out_rate, layout="mono")
        ctx = stream.codec_context
        frame = av.AudioFrame.from_ndarray(data[None, :], format="fltp", layout="mono")
        frame.sample_rate = out_rate
        # the encoder wants its own sample format and fixed-size frames
        to_codec = av.AudioResampler(format=ctx.codec.audio_formats[0].name, layout="mono", rate=out_rate,
                                     frame_size=ctx.frame_size or None)
        for f in to_codec.resample(frame) + to_codec.resample(None):
            container.mux(stream.encode(f))
        container.mux(stream.encode(None))
    return buf.getvalue()


class LiveServer:
    """uvicorn serving ``create_app(engine, settings)`` on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self, engine, settings):
        import uvicorn

        from runtime.server import create_app

        self.engine = engine
        config = uvicorn.Config(create_app(engine, settings), host="127.0.0.1", port=0, log_level="warning",
                                timeout_graceful_shutdown=30)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


if __name__ == "__main__":  # serve the fixture model until SIGTERM; the SIGTERM test's subprocess
    from runtime.server import ServerSettings, serve

    serve(build_engine(), ServerSettings(), "127.0.0.1", int(sys.argv[1]), drain_timeout=60)
