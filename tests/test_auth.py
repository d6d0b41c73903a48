"""Optional API key: with one, every route but the probes needs ``Authorization: Bearer <key>``; a missing or
wrong key gets 401 in OpenAI's error shape before the body is read; the key never shows in logs or messages."""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys

import pytest

pytest.importorskip("fastapi", reason="needs the serving extra")
openai = pytest.importorskip("openai", reason="needs the official openai client")

from benchmarks.soak import free_port  # noqa: E402
from serving_helpers import TINY, LiveServer, build_engine, golden_text  # noqa: E402
from test_server import _reachable, transcribe, wait_for  # noqa: E402
from runtime.server import API_KEY_ENV, ServerSettings, add_arguments, run, server_settings  # noqa: E402

KEY = "sk-canary-" + "3f9c1e7a" * 5  # distinctive, to look for in logs
WRONG = "sk-wrong-" + "b2d4" * 8


@pytest.fixture(scope="module")
def server():
    s = LiveServer(build_engine(), ServerSettings(max_upload_bytes=1 << 20, api_key=KEY))
    yield s
    s.stop()


def request(url: str, method: str, path: str, authorization: str | None, body: bytes = b"",
            content_type: str | None = None) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Authorization": authorization} if authorization is not None else {}
    if content_type:
        headers["Content-Type"] = content_type
    try:
        conn.request(method, path, body or None, headers)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_the_right_key_transcribes(server):
    for scheme in ("Bearer", "bearer"):  # the scheme is case-insensitive (RFC 7235)
        status, _, body = request(server.url, "GET", "/v1/models", f"{scheme} {KEY}")
        assert status == 200 and json.loads(body)["data"][0]["id"] == ServerSettings.model_name
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    assert transcribe(client, "a3_fox").text == golden_text("a3_fox")
    assert list(transcribe(client, "a1_yes", stream=True))[-1].text == golden_text("a1_yes")


@pytest.mark.parametrize("authorization", [None, "", f"Bearer {WRONG}", f"Bearer {KEY}x", f"Bearer {KEY[:-1]}",
                                           f"Basic {KEY}", "Bearer", KEY, f"Bearer {KEY.upper()}"])
def test_a_missing_or_wrong_key_gets_401_in_openai_shape(server, authorization):
    routes = [("POST", "/v1/audio/transcriptions"), ("GET", "/v1/models"), ("GET", "/metrics"),
              ("GET", "/no/such/route"), ("GET", "/docs")]
    for method, path in routes:
        status, headers, body = request(server.url, method, path, authorization)
        assert status == 401, (method, path)
        assert headers["www-authenticate"] == "Bearer"
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
        assert error["message"] and KEY not in error["message"] and WRONG not in error["message"]


def test_the_key_is_checked_before_the_upload_is_read(server):
    """An unauthenticated upload over the size limit is a 401, not a 413: nothing of it was parsed."""
    status, _, body = request(server.url, "POST", "/v1/audio/transcriptions", f"Bearer {WRONG}",
                              body=b"\0" * (2 << 20), content_type="multipart/form-data; boundary=x")
    assert status == 401 and json.loads(body)["error"]["message"] == "incorrect API key provided"


def test_openai_client_with_a_wrong_key_raises_authentication_error(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=WRONG, max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError) as e:
        transcribe(client, "a1_yes")
    assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"


def test_probes_stay_open(server):
    for path in ("/health", "/ready"):
        status, _, body = request(server.url, "GET", path, None)
        assert status == 200 and json.loads(body)["status"] in ("ok", "ready")


def test_key_from_the_flag_or_the_environment(monkeypatch, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert server_settings(parser.parse_args([])).api_key is None  # no key: no authentication
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert server_settings(parser.parse_args([])).api_key == KEY
    settings = server_settings(parser.parse_args(["--api-key", "other"]))  # the flag wins
    assert settings.api_key == "other" and "other" not in repr(settings)
    assert KEY not in parser.format_help()
    assert run(parser.parse_args(["--api-key", ""])) == 2  # an empty key is refused, not taken as "no key"
    assert "API key is empty" in capsys.readouterr().err


def test_the_key_never_reaches_the_logs(tmp_path):
    """``canary-trt serve`` with the key in its environment and uvicorn's access log on: requests with the right
    key, a wrong one and none are served and logged, and neither key appears in the output."""
    port = free_port()
    env = {**os.environ, API_KEY_ENV: KEY, "PYTHONPATH": os.pathsep.join(sys.path)}
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "-v", "serve", "--model", str(TINY.root / "model"),
                             "--llm", str(TINY.root / "llm"), "--max-new-tokens", str(TINY.max_new_tokens),
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _reachable(url), timeout=120, what="the server process")
        wav = TINY.audio_path("a1_yes").read_bytes()
        form = (b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n" + wav
                + b"\r\n--x--\r\n")
        answers = [request(url, "POST", "/v1/audio/transcriptions", auth, form, "multipart/form-data; boundary=x")[0]
                   for auth in (f"Bearer {KEY}", f"Bearer {WRONG}", None)]
        assert answers == [200, 401, 401]
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    log.seek(0)
    text = log.read()
    assert '"POST /v1/audio/transcriptions HTTP/1.1" 401' in text  # the access log was captured
    assert KEY not in text and WRONG not in text


def test_bench_serve_sends_the_key(server, monkeypatch, tmp_path):
    """``canary-trt bench-serve --api-key`` (or $CANARY_TRT_API_KEY) authenticates every request; without it
    every request is a 401."""
    from runtime import bench_serve

    wav = str(TINY.audio_path("a1_yes"))
    out = tmp_path / "load.json"
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    args = ["--url", server.url, "--files", wav, "--concurrency", "2", "--requests", "4", "--out", str(out)]
    assert bench_serve.main([*args, "--api-key", KEY]) == 0
    assert json.loads(out.read_text())["levels"][0]["ok"] == 4
    assert bench_serve.main(args) == 1
    assert json.loads(out.read_text())["levels"][0]["errors"] == {"http_401": 4}
    monkeypatch.setenv(API_KEY_ENV, KEY)
    assert bench_serve.main(args) == 0
