"""``canary-trt transcribe-dataset`` on a local Ray cluster on CPU (2 actors, each with the fixture engine):
rows equal the single-process CLI's jsonl, a corrupted file gives exactly one error row, an actor killed mid-job
loses no row and duplicates none, and a rerun over finished output transcribes nothing.

One Ray cluster serves every test (its start-up is slow on 2 cores); it has 4 logical CPUs so the 2 actors
(1 CPU each) leave room for the read tasks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="needs Ray: pip install 'canary-trt[ray]'")

from conftest import FIXTURES  # noqa: E402
from runtime.cli import main  # noqa: E402
from runtime.dataset import finished_ids, transcribe_dataset  # noqa: E402

HERE = Path(__file__).resolve().parent
TINY = FIXTURES / "tiny-canary-qwen"
MANIFEST = HERE.parent / "benchmarks" / "manifests" / "tiny_fixture.jsonl"
MODEL_ARGS = ["--model", str(TINY / "model"), "--llm", str(TINY / "llm"), "--device", "cpu",
              "--max-new-tokens", "24", "--batch-size", "8", "--max-queue", "64"]
REPEATS = 3


@pytest.fixture(scope="module")
def cluster():
    # The workers import this module for the crashing engine factory below.
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The fixture manifest repeated REPEATS times (ids r<k>-<stem>), relative paths, plus one corrupted file."""
    root = tmp_path_factory.mktemp("corpus")
    shutil.copytree(TINY / "audio", root / "audio")
    (root / "audio" / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage" * 4)
    rows = [json.loads(line) for line in MANIFEST.read_text().splitlines() if line.strip()]
    lines = []
    for k in range(REPEATS):
        for r in rows:
            name = Path(r["audio_filepath"]).name
            lines.append({"id": f"r{k}-{name}", "audio_filepath": f"audio/{name}", "duration": r["duration"]})
    lines.insert(4, {"id": "broken", "audio_filepath": "audio/broken.wav", "duration": 1.0})
    manifest = root / "manifest.json"
    manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return {"manifest": manifest, "ids": [x["id"] for x in lines],
            "files": sorted({str(root / x["audio_filepath"]) for x in lines})}


@pytest.fixture(scope="module")
def cli_rows(corpus):
    """The single-process reference: ``canary-trt transcribe --output-format jsonl``, by audio path."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["transcribe", *corpus["files"], *MODEL_ARGS, "--output-format", "jsonl", "--no-progress"]) == 1
    return {r["audio"]: r for r in map(json.loads, out.getvalue().splitlines())}


def rows_of(output: Path) -> list[dict]:
    return [json.loads(line) for part in sorted(output.glob("part-*.jsonl")) for line in part.read_text().splitlines()]


def engine_kwargs(**over) -> dict:
    from argparse import Namespace

    from runtime.options import engine_kwargs as kwargs

    args = Namespace(model=str(TINY / "model"), llm=str(TINY / "llm"), device="cpu", dtype="auto", merge_lora=False,
                     encoder="auto", artifacts=None, engine_dir=None, max_batch_size=8, max_queue=64,
                     max_seq_len=1024, max_new_tokens=24, kv_cache_tokens=None, no_cuda_graphs=False)
    return {**kwargs(args), **over}


def test_rows_equal_the_cli_and_a_rerun_does_nothing(cluster, corpus, cli_rows, tmp_path):
    """The command as users run it: a process of its own, which starts its own Ray cluster (2 actors on this
    2-core machine must still leave a CPU to read the manifest with)."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "runtime.cli", "transcribe-dataset", str(corpus["manifest"]),
                           "--output", str(out), "--replicas", "2", "--rows-per-batch", "3", "--no-progress",
                           *MODEL_ARGS], capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.splitlines()[-1])
    rows = rows_of(out)
    assert sorted(r["id"] for r in rows) == sorted(corpus["ids"])
    assert summary["processed"] == len(rows) and summary["errors"] == 1 and summary["skipped"] == 0
    assert summary["audio_seconds"] == pytest.approx(sum(r["duration"] or 0 for r in rows), abs=1e-2)
    errors = [r for r in rows if r["error"] is not None]
    assert [r["id"] for r in errors] == ["broken"]
    assert "cannot decode audio" in errors[0]["error"] and "broken.wav" in errors[0]["error"]
    assert "error" in cli_rows[errors[0]["audio"]]
    for r in rows:
        if r["error"] is None:
            ref = cli_rows[r["audio"]]
            assert {k: r[k] for k in ref} == ref, r["id"]
    assert len({r["text"] for r in rows if r["text"]}) == 5  # five different clips, five different transcripts

    # a second run over the finished output transcribes nothing (and starts no engine)
    again = transcribe_dataset(str(corpus["manifest"]), str(out), engine_kwargs(), replicas=2, rows_per_batch=3,
                               progress=False)
    assert (again.processed, again.skipped, again.files) == (0, len(rows), len(rows))
    assert rows_of(out) == rows

    # resumable: a lost part file is transcribed again, and only it
    parts = sorted(out.glob("part-*.jsonl"))
    lost = [json.loads(line)["id"] for line in parts[0].read_text().splitlines()]
    parts[0].unlink()
    resumed = transcribe_dataset(str(corpus["manifest"]), str(out), engine_kwargs(), replicas=2,
                                 rows_per_batch=3, progress=False)
    assert resumed.processed == len(lost) and resumed.skipped == len(rows) - len(lost)
    assert Counter(finished_ids(str(out))) == Counter(corpus["ids"])


def crashing_engine(marker: str, starts: str, **kwargs):
    """Engine factory run in the Ray actors: the first actor to claim ``marker`` SIGKILLs itself after its
    second result, mid-batch (as the OOM killer or a node failure would). Every start is logged to ``starts``."""
    from runtime.engine import Engine

    with open(starts, "a") as f:
        f.write(f"{os.getpid()}\n")
    engine = Engine.from_pretrained(**kwargs)
    real_map = engine.map

    def map_then_die(inputs, **kw):
        for n, item in enumerate(real_map(inputs, **kw)):
            if n == 1:
                try:
                    os.rename(marker, marker + ".claimed")  # atomic: exactly one actor, once
                except FileNotFoundError:
                    pass
                else:
                    os.kill(os.getpid(), signal.SIGKILL)
            yield item

    engine.map = map_then_die
    return engine


def test_killed_actor_loses_no_rows_and_duplicates_none(cluster, corpus, cli_rows, tmp_path):
    marker, starts = tmp_path / "crash-once", tmp_path / "starts"
    marker.touch()
    out = tmp_path / "out"
    summary = transcribe_dataset(str(corpus["manifest"]), str(out),
                                 engine_kwargs(marker=str(marker), starts=str(starts)), replicas=2,
                                 rows_per_batch=2, engine_factory="test_dataset:crashing_engine", progress=False)
    assert not marker.exists() and Path(str(marker) + ".claimed").exists()  # an actor did die
    assert len(starts.read_text().split()) >= 3  # 2 actors + the restarted one
    rows = rows_of(out)
    assert Counter(r["id"] for r in rows) == Counter(corpus["ids"])  # every row once
    assert summary.processed == len(rows) and summary.errors == 1
    for r in rows:
        if r["error"] is None:
            ref = cli_rows[r["audio"]]
            assert {k: r[k] for k in ref} == ref, r["id"]


def test_folder_input_with_parquet_output_and_rerun(cluster, corpus, cli_rows, tmp_path):
    """A folder of audio (rows keyed by path) into parquet part files; the rerun reads them back and skips all."""
    import pyarrow.parquet as pq

    audio, out = corpus["manifest"].parent / "audio", tmp_path / "out"
    first = transcribe_dataset(str(audio), f"file://{out}", engine_kwargs(), replicas=1, rows_per_batch=3,
                               output_format="parquet", progress=False)
    rows = [r for part in sorted(out.glob("part-*.parquet")) for r in pq.read_table(part).to_pylist()]
    assert sorted(r["audio"] for r in rows) == corpus["files"] and all(r["id"] == r["audio"] for r in rows)
    assert first.processed == len(rows) and first.errors == 1
    for r in rows:
        ref = cli_rows[r["audio"]]
        if "error" in ref:
            assert r["error"] and r["text"] is None
        else:
            assert {k: r[k] for k in ref} == ref and r["error"] is None
    again = transcribe_dataset(str(audio), str(out), engine_kwargs(), replicas=1, rows_per_batch=3,
                               output_format="parquet", progress=False)
    assert (again.processed, again.skipped) == (0, len(rows))


def test_parquet_and_url_inputs(cluster, corpus, tmp_path):
    """A parquet file with a `path` column (relative paths: to its folder), a file:// URL, a table without an
    audio column."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runtime.dataset import read_inputs

    shutil.copytree(corpus["manifest"].parent / "audio", tmp_path / "audio")
    names = [Path(f).name for f in corpus["files"]]
    pq.write_table(pa.table({"path": [f"audio/{n}" for n in names]}), tmp_path / "corpus.parquet")
    rows = read_inputs(str(tmp_path / "corpus.parquet")).take_all()
    assert sorted(r["audio"] for r in rows) == sorted(str(tmp_path / "audio" / n) for n in names)
    via_url = read_inputs(f"file://{corpus['manifest']}").take_all()
    assert sorted((r["id"], r["audio"]) for r in via_url) == sorted(
        (i, str(corpus["manifest"].parent / "audio" / ("broken.wav" if i == "broken" else i.split("-", 1)[1])))
        for i in corpus["ids"])
    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no audio path column"):
        read_inputs(str(tmp_path / "bad.parquet"))


def test_actor_reads_fsspec_urls(corpus, cli_rows):
    """The actor's own work, in this process: audio at an fsspec URL (memory://) is fetched and transcribed like
    the local file; a missing one is an error row naming it."""
    import fsspec
    import pyarrow as pa

    from runtime.dataset import Transcriber

    local = next(f for f in corpus["files"] if "error" not in cli_rows[f])
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/clip.wav", Path(local).read_bytes())
    batch = pa.table({"id": ["a", "b"], "audio": ["memory://corpus/clip.wav", "memory://corpus/missing.wav"]})
    got, missing = Transcriber(engine_kwargs())(batch).to_pylist()
    ref = cli_rows[local]
    assert {k: got[k] for k in ref if k != "audio"} == {k: v for k, v in ref.items() if k != "audio"}
    assert got["error"] is None and missing["text"] is None and "memory://corpus/missing.wav" in missing["error"]


def test_an_engine_that_cannot_start_fails_the_job_clearly(cluster, corpus, tmp_path, capsys):
    code = main(["transcribe-dataset", str(corpus["manifest"]), "--output", str(tmp_path / "out"), "--no-progress",
                 "--rows-per-batch", "3", *MODEL_ARGS, "--model", str(tmp_path / "no-model")])
    assert code == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: the job failed:") and "no-model" in err and "no such folder" in err
    assert not list((tmp_path / "out").glob("part-*"))
