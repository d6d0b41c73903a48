"""``canary_qwen`` with two instances in a real tritonserver (the one nvidia-pytriton bundles, CPU-only): 16
concurrent streamed requests, every result equal to the offline engine's, and both instances used.

Triton's statistics and metrics are per model, not per instance, so the instances report themselves: each logs
``instance <name> ready`` once and, in verbose logging, ``instance <name> took request <id>`` per request. Runs
in the separate venv .ci/run makes (.venv-triton) and skips elsewhere, as tests/test_triton.py does.
"""

from __future__ import annotations

import re
from collections import Counter

import pytest

from serving_helpers import TINY, build_engine
from test_triton import SEPARATE_VENV, _engine_args, _Stream, _text, serve_repository
from runtime.triton.repository import instance_group, write_repository

REQUESTS = 16


def test_instance_group_text():
    assert instance_group() == "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    assert instance_group(2) == "instance_group [ { count: 2 kind: KIND_CPU } ]\n"
    assert instance_group(3, [0, 1]) == "instance_group [ { count: 3 kind: KIND_GPU gpus: [ 0, 1 ] } ]\n"
    for count, gpus in ((0, None), (1, [0, 0]), (1, [-1])):
        with pytest.raises(ValueError):
            instance_group(count, gpus)


def test_triton_repo_cli_gpus_and_instances_parse_as_model_config(tmp_path):
    """--gpus 0,1 --instances-per-gpu 2 -> KIND_GPU, 2 per GPU; --instances-per-gpu 3 alone -> KIND_CPU x 3."""
    import argparse

    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason=SEPARATE_VENV)
    from google.protobuf import text_format

    from runtime.triton.repository import add_arguments, run

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    model = ["--model", str(TINY.root / "model")]
    for flags, kind, count, gpus in ((["--gpus", "0,1", "--instances-per-gpu", "2"], pb.ModelInstanceGroup.KIND_GPU,
                                      2, [0, 1]),
                                     (["--instances-per-gpu", "3"], pb.ModelInstanceGroup.KIND_CPU, 3, [])):
        out = tmp_path / pb.ModelInstanceGroup.Kind.Name(kind)
        assert run(parser.parse_args([str(out), *model, *flags])) == 0
        cfg = text_format.Parse((out / "canary_qwen" / "config.pbtxt").read_text(), pb.ModelConfig())
        (group,) = cfg.instance_group
        assert (group.kind, group.count, list(group.gpus)) == (kind, count, gpus)
    for bad in ("0,0", "0,x", "-1"):
        assert run(parser.parse_args([str(tmp_path / "x"), *model, f"--gpus={bad}"])) == 2
    assert run(parser.parse_args([str(tmp_path / "y"), *model, "--gpus", "0", "--device", "cpu"])) == 2


@pytest.fixture(scope="module")
def two_instances(tmp_path_factory):
    """tritonserver (verbose log) serving canary_qwen with instance_group count 2, KIND_CPU, fixture engine."""
    pytest.importorskip("tritonclient.grpc", reason=SEPARATE_VENV)
    pytest.importorskip("pytriton.triton", reason=SEPARATE_VENV)
    work = tmp_path_factory.mktemp("triton_instances")
    repo = work / "models"
    write_repository(repo, _engine_args(), engine_factory="serving_helpers:engine_factory",
                     instances=instance_group(2))
    yield from serve_repository(work, repo, verbose=True)


def test_two_instances_serve_concurrent_streams_like_the_offline_engine(two_instances):
    stems = [TINY.stems[i % len(TINY.stems)] for i in range(REQUESTS)]
    with build_engine() as engine:  # the offline reference: the same fixture engine, in this process
        offline = dict(zip(TINY.stems, engine.transcribe([TINY.audio_path(s) for s in TINY.stems])))
    config = two_instances["http"].get_model_config("canary_qwen")
    assert config["instance_group"][0]["count"] == 2 and config["instance_group"][0]["kind"] == "KIND_CPU"

    s = _Stream(two_instances["grpc"])
    try:
        for i, stem in enumerate(stems):  # all sent before any answer is read: 16 in flight at once
            s.send(f"{i}-{stem}", audio=TINY.audio_path(stem).read_bytes(), stream=True)
        got = s.until_final(REQUESTS)
    finally:
        s.client.stop_stream()
    assert len(got) == REQUESTS
    for rid, responses in got.items():
        *partial, final = responses
        want = offline[rid.split("-", 1)[1]]
        assert _text(final) == want.text, rid
        assert final.as_numpy("TOKEN_IDS").tolist() == want.token_ids, rid
        assert final.as_numpy("FINISH_REASON")[0].decode() == want.finish_reason, rid
        assert "".join(_text(p) for p in partial) == want.text, rid  # the streamed pieces add up

    log = two_instances["log"].read_text()
    ready = set(re.findall(r"canary_qwen: instance (\S+) ready on", log))
    took = Counter(re.findall(r"canary_qwen: instance (\S+) took request \d+", log))
    assert len(ready) == 2, ready  # two processes, each with its own engine
    assert set(took) == ready and sum(took.values()) == REQUESTS, took  # both took requests, 16 in all
