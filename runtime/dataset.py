"""``canary-trt transcribe-dataset INPUT --output OUT``: transcribe a corpus across a Ray cluster with Ray Data.

INPUT is a NeMo manifest or any JSONL file with an audio path column, a parquet file with one, or a folder of
audio files, on local disk or at any fsspec URL (``s3://``, ``gs://``, ...). Relative audio paths are resolved
against the manifest's folder, as NeMo does. Each row is keyed by its ``id`` column when it has one, else by its
resolved audio path (so a corpus that lists one file twice under no id gets it transcribed twice).

Ray Data reads the rows and ``map_batches`` sends them to a fixed pool of ``--replicas`` actors, each holding
one ``runtime.Engine`` on its GPU (``--gpus-per-replica``) or on CPU. An actor submits its whole batch to the
engine at once (in-flight batching), and runs two calls at a time so the next batch fills the engine while the
last one's longest utterances finish. A file that cannot be read or decoded becomes a row with ``error`` set;
it never fails the job. Ray restarts an actor that dies and retries its batch.

The driver writes each finished batch as one part file (``part-<run>-<n>.jsonl`` or ``.parquet``) under OUT,
written to a temporary name then renamed, so a part file is either whole or absent. A rerun with the same OUT
reads the ids already there and transcribes only the rest (resumable); results go through the driver, which
also drives the progress bar and the RTFx summary: transcripts are small next to audio.

Output rows: ``id``, ``audio`` (the resolved path or URL), ``text``, ``token_ids``, ``duration`` (seconds of
audio), ``finish_reason``, ``error`` (null on success; text, token_ids, duration and finish_reason are null
on error). Rows arrive in completion order, not input order.

Ray (``pip install canary-trt[ray]``) and pyarrow are imported only when a job runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import posixpath
import sys
import time
import uuid
from dataclasses import asdict, dataclass

from .bench import AUDIO_SUFFIXES

log = logging.getLogger(__name__)

AUDIO_COLUMNS = ("audio_filepath", "audio_path", "audio", "path", "file", "filename")  # first present is used
ID_COLUMN = "id"
OUTPUT_FORMATS = ("jsonl", "parquet")
PART_PREFIX = "part-"
TMP_PREFIX = "_tmp-"  # written, then renamed to part-*: resume never reads a half-written file
CALLS_PER_ACTOR = 2  # batches in one engine at once: the next fills the in-flight batch while the last drains


class DatasetError(ValueError):
    """An input or output that cannot be used; the message names it."""


def result_schema():
    import pyarrow as pa

    return pa.schema([("id", pa.string()), ("audio", pa.string()), ("text", pa.string()),
                      ("token_ids", pa.list_(pa.int32())), ("duration", pa.float64()),
                      ("finish_reason", pa.string()), ("error", pa.string())])


@dataclass
class Summary:
    files: int  # rows in INPUT
    skipped: int  # already in OUT from an earlier run
    processed: int  # transcribed in this run, errors included
    errors: int
    audio_seconds: float  # of the rows transcribed in this run
    wall_seconds: float  # this run, from reading INPUT to the last part file (actor start-up included)
    rtfx: float  # audio_seconds / wall_seconds
    output: str


# ---- input ------------------------------------------------------------------------------------------------------

def _is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _plain(path: str) -> str:
    """A file:// URL as the local path it names; anything else unchanged."""
    return path[len("file://"):] if path.startswith("file://") else path


def _fs(url: str):
    """(fsspec filesystem, path inside it) for a local path or any fsspec URL."""
    import fsspec

    return fsspec.core.url_to_fs(url)


def _arrow_fs(url: str):
    """What Ray's readers take as ``filesystem`` for ``url`` (None for local paths: Ray's own default)."""
    if not _is_url(url):
        return None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    return PyFileSystem(FSSpecHandler(_fs(url)[0]))


def _join(base: str, path: str) -> str:
    """A manifest's audio path, resolved against the manifest's folder unless absolute or a URL."""
    path = _plain(path)
    if _is_url(path) or os.path.isabs(path) or not base:
        return path
    return posixpath.normpath(posixpath.join(base, path)) if _is_url(base) else os.path.normpath(
        os.path.join(base, path))


def _keyed_rows(batch, audio_column: str, id_column: str | None, base: str):
    """Ray task: an input batch -> the two columns the actors read, ``id`` and ``audio`` (resolved)."""
    import pyarrow as pa

    audio = [None if a is None else _join(base, str(a)) for a in batch.column(audio_column).to_pylist()]
    ids = batch.column(id_column).to_pylist() if id_column else audio
    return pa.table({"id": pa.array([None if i is None else str(i) for i in ids], pa.string()),
                     "audio": pa.array(audio, pa.string())})


def read_inputs(source: str, audio_column: str | None = None, id_column: str | None = None):
    """INPUT as a Ray Dataset of (``id``, ``audio``) rows; raises DatasetError naming what is wrong."""
    import ray.data

    source = _plain(source)
    fs, path = _fs(source)
    if not fs.exists(path):
        raise DatasetError(f"{source}: no such file or folder")
    if fs.isdir(path):
        files = sorted(p for p in fs.find(path) if os.path.splitext(p)[1].lower() in AUDIO_SUFFIXES)
        if not files:
            raise DatasetError(f"{source}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
        urls = [fs.unstrip_protocol(p) if _is_url(source) else p for p in files]
        return ray.data.from_items([{"id": u, "audio": u} for u in urls])
    if path.endswith(".parquet"):
        ds = ray.data.read_parquet(source, filesystem=_arrow_fs(source))
    else:  # a NeMo manifest or another JSON-lines file, whatever its suffix
        ds = ray.data.read_json(source, lines=True, filesystem=_arrow_fs(source), file_extensions=None)
    names = ds.schema().names
    if audio_column is None:
        audio_column = next((c for c in AUDIO_COLUMNS if c in names), None)
        if audio_column is None:
            raise DatasetError(f"{source}: no audio path column (looked for {', '.join(AUDIO_COLUMNS)}; "
                               f"columns: {', '.join(names)}); name it with --audio-column")
    elif audio_column not in names:
        raise DatasetError(f"{source}: no column {audio_column!r} (columns: {', '.join(names)})")
    if id_column is None:
        id_column = ID_COLUMN if ID_COLUMN in names else None
    elif id_column not in names:
        raise DatasetError(f"{source}: no column {id_column!r} (columns: {', '.join(names)})")
    base = source[: source.rstrip("/").rfind("/")] if _is_url(source) else os.path.dirname(os.path.abspath(source))
    return ds.map_batches(_keyed_rows, batch_format="pyarrow", batch_size=None,
                          fn_kwargs={"audio_column": audio_column, "id_column": id_column, "base": base})


# ---- the actors ------------------------------------------------------------------------------------------------

class Transcriber:
    """A Ray actor holding one Engine; ``__call__`` transcribes one batch of (id, audio) rows."""

    def __init__(self, engine_kwargs: dict, engine_factory: str | None = None, cpus: float = 1.0):
        import torch

        from .engine import Engine

        if engine_kwargs.get("device", "auto") in ("auto", None) and not torch.cuda.is_available():
            engine_kwargs = {**engine_kwargs, "device": "cpu"}
        if not torch.cuda.is_available() or str(engine_kwargs.get("device")) == "cpu":
            torch.set_num_threads(max(1, int(cpus)))  # the actor's share of the node, not every core
        make = Engine.from_pretrained
        if engine_factory:
            import importlib

            module, _, attr = engine_factory.partition(":")
            make = importlib.import_module(module)
            for part in attr.split("."):
                make = getattr(make, part)
        self.engine = make(**engine_kwargs)

    def __call__(self, batch):
        import pyarrow as pa

        ids, audio = batch.column("id").to_pylist(), batch.column("audio").to_pylist()
        rows: list[dict | None] = [None] * len(ids)
        todo: list[tuple[int, object]] = []  # (row, what the engine reads: a local path or the bytes of a URL)
        for i, (key, src) in enumerate(zip(ids, audio)):
            try:
                if not src:
                    raise ValueError("no audio path")
                todo.append((i, _read_bytes(src) if _is_url(src) else src))
            except Exception as e:  # unreadable: this row fails alone
                rows[i] = _error_row(key, src, e)
        results = self.engine.map(x for _, x in todo)
        for (i, _), (_, r) in zip(todo, results):
            rows[i] = _error_row(ids[i], audio[i], r) if isinstance(r, Exception) else {
                "id": ids[i], "audio": audio[i], "text": r.text, "token_ids": r.token_ids,
                "duration": round(r.duration, 4), "finish_reason": r.finish_reason, "error": None}
        return pa.Table.from_pylist(rows, schema=result_schema())


def _read_bytes(url: str) -> bytes:
    import fsspec

    with fsspec.open(url, "rb") as f:
        return f.read()


def _error_row(key, src, error: BaseException) -> dict:
    msg = str(error)
    if src and str(src) not in msg:
        msg = f"{src}: {msg}"
    log.warning("%s", msg)
    return {"id": key, "audio": src, "text": None, "token_ids": None, "duration": None, "finish_reason": None,
            "error": msg}


def _drop_done(batch, done: frozenset):
    """Ray task: the rows of an input batch whose id OUT does not hold yet."""
    import pyarrow as pa

    return batch.filter(pa.array([i not in done for i in batch.column("id").to_pylist()], pa.bool_()))


# ---- output ------------------------------------------------------------------------------------------------------

def finished_ids(output: str) -> list[str]:
    """The ids of every row in OUT's part files (errors included: a bad file stays bad)."""
    fs, path = _fs(output)
    if not fs.exists(path):
        return []
    ids: list[str] = []
    for part in sorted(fs.glob(posixpath.join(path, PART_PREFIX + "*"))):
        if part.endswith(".parquet"):
            import pyarrow.parquet as pq

            with fs.open(part, "rb") as f:
                ids += pq.read_table(f, columns=["id"]).column("id").to_pylist()
        elif part.endswith(".jsonl"):
            with fs.open(part, "rt", encoding="utf-8") as f:
                ids += [json.loads(line)["id"] for line in f if line.strip()]
    return ids


def write_part(output: str, name: str, table, fmt: str) -> None:
    """One part file, whole or not at all: written under a temporary name, then renamed."""
    fs, path = _fs(output)
    tmp, final = posixpath.join(path, TMP_PREFIX + name), posixpath.join(path, name)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with fs.open(tmp, "wb") as f:
            pq.write_table(table, f)
    else:
        with fs.open(tmp, "wt", encoding="utf-8") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    fs.mv(tmp, final)


# ---- the job ------------------------------------------------------------------------------------------------------

def transcribe_dataset(source: str, output: str, engine_kwargs: dict, replicas: int = 1,
                       gpus_per_replica: float | None = None, cpus_per_replica: float = 1.0,
                       rows_per_batch: int = 64, output_format: str = "jsonl", audio_column: str | None = None,
                       id_column: str | None = None, engine_factory: str | None = None, ray_address: str | None = None,
                       progress: bool = True) -> Summary:
    """Transcribe every row of ``source`` not already in ``output``; see the module docstring.
    ``gpus_per_replica`` None: 1 when the cluster has GPUs, else 0 (CPU engines)."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    if replicas < 1 or rows_per_batch < 1:
        raise DatasetError("--replicas and --rows-per-batch must be >= 1")
    if output_format not in OUTPUT_FORMATS:
        raise DatasetError(f"unknown output format {output_format!r} ({' | '.join(OUTPUT_FORMATS)})")
    queue = engine_kwargs.get("max_queue", 1024)
    if CALLS_PER_ACTOR * rows_per_batch > queue:
        raise DatasetError(f"--rows-per-batch {rows_per_batch} x {CALLS_PER_ACTOR} batches per replica exceeds "
                           f"--max-queue {queue}")
    start = time.perf_counter()
    source, output = _plain(source), _plain(output)
    actor_cpus = replicas * cpus_per_replica
    if not ray.is_initialized():
        if ray_address is None and not os.environ.get("RAY_ADDRESS"):
            # A new cluster of our own on this machine ("local": not one that `ray start` left running), with
            # room for every actor and the tasks that read INPUT (logical CPUs: a CPU engine gets one torch
            # thread per CPU of its own).
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(actor_cpus) + 1),
                     log_to_driver=False)
        else:
            ray.init(address=ray_address, log_to_driver=False)
    cluster = ray.cluster_resources()
    if gpus_per_replica is None:
        gpus_per_replica = 1 if cluster.get("GPU", 0) > 0 else 0
    # A fixed pool larger than the cluster waits until an autoscaler grows it; Ray Data also needs a CPU beyond
    # the actors' to read INPUT with.
    if cluster.get("CPU", 0) - actor_cpus < 1 or replicas * gpus_per_replica > cluster.get("GPU", 0):
        log.warning("%d replicas x (%g CPUs, %g GPUs) + 1 CPU to read with > the cluster's %g CPUs and %g GPUs: "
                    "the job waits until an autoscaler adds them", replicas, cpus_per_replica, gpus_per_replica,
                    cluster.get("CPU", 0), cluster.get("GPU", 0))
    if not gpus_per_replica and engine_kwargs.get("device", "auto") == "auto":
        engine_kwargs = {**engine_kwargs, "device": "cpu"}  # no GPU reserved: never use one by accident
    DataContext.get_current().enable_progress_bars = False  # ours (files, audio seconds, RTFx) instead
    ds = read_inputs(source, audio_column, id_column)
    files = ds.count()
    done = frozenset(finished_ids(output))
    fs, out_path = _fs(output)
    fs.makedirs(out_path, exist_ok=True)
    todo = files
    if done:
        ds = ds.map_batches(_drop_done, batch_format="pyarrow", batch_size=None, fn_kwargs={"done": done})
        todo = ds.count()  # reads INPUT once more: cheap next to transcribing it
    log.info("%s: %d rows, %d of them already in %s", source, files, files - todo, output)
    if todo == 0:  # nothing left: start no actor (each would load a model)
        return Summary(files, files, 0, 0, 0.0, round(time.perf_counter() - start, 3), 0.0, output)
    ds = ds.map_batches(Transcriber, batch_format="pyarrow", batch_size=rows_per_batch,
                        fn_constructor_kwargs={"engine_kwargs": engine_kwargs, "engine_factory": engine_factory,
                                               "cpus": cpus_per_replica},
                        compute=ActorPoolStrategy(size=replicas, max_concurrent_calls_per_actor=CALLS_PER_ACTOR,
                                                  enable_true_multi_threading=True),
                        num_gpus=gpus_per_replica, num_cpus=cpus_per_replica)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=todo, unit="file", file=sys.stderr, desc="transcribe-dataset")
    run = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    processed = errors = 0
    audio_seconds = 0.0
    for n, table in enumerate(ds.iter_batches(batch_size=None, batch_format="pyarrow")):
        if table.num_rows == 0:
            continue
        write_part(output, f"{PART_PREFIX}{run}-{n:06d}.{output_format}", table, output_format)
        processed += table.num_rows
        errors += table.num_rows - table.column("error").null_count
        audio_seconds += sum(d for d in table.column("duration").to_pylist() if d is not None)
        if bar:
            bar.update(table.num_rows)
            bar.set_postfix(audio_h=f"{audio_seconds / 3600:.2f}",
                            rtfx=f"{audio_seconds / (time.perf_counter() - start):.1f}", errors=errors)
    if bar:
        bar.close()
    wall = time.perf_counter() - start
    return Summary(files, files - todo, processed, errors, round(audio_seconds, 3), round(wall, 3),
                   round(audio_seconds / wall, 2) if wall > 0 else 0.0, output)


# ---- command line --------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``canary-trt transcribe-dataset``."""
    from .options import add_engine_arguments

    parser.add_argument("input", metavar="INPUT",
                        help="NeMo manifest / JSONL / parquet with an audio path column, or a folder; local or URL")
    parser.add_argument("--output", required=True, metavar="OUT",
                        help="folder (local or URL) of part files; a rerun skips the rows already there")
    parser.add_argument("--output-format", choices=OUTPUT_FORMATS, default="jsonl")
    parser.add_argument("--ray-address", default=None,
                        help="Ray cluster to join, e.g. ray://head:10001, or 'auto' for the one `ray start` runs "
                             "here (default: $RAY_ADDRESS, else a new cluster on this machine)")
    parser.add_argument("--replicas", type=int, default=1, help="actors, each with one engine (default: 1)")
    parser.add_argument("--gpus-per-replica", type=float, default=None,
                        help="default: 1 when the cluster has GPUs, else 0 (engines on CPU)")
    parser.add_argument("--cpus-per-replica", type=float, default=1.0, help="(default: %(default)s)")
    parser.add_argument("--rows-per-batch", type=int, default=64,
                        help="rows handed to an actor per call, submitted to its engine at once (default: 64)")
    parser.add_argument("--audio-column", default=None, help=f"default: the first of {', '.join(AUDIO_COLUMNS)}")
    parser.add_argument("--id-column", default=None, help="row key for resuming (default: 'id' if present, else "
                                                          "the audio path)")
    parser.add_argument("--engine-factory", default=None, metavar="MODULE:FUNCTION",
                        help="makes the Engine from the same keywords as Engine.from_pretrained (custom backends)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_engine_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``canary-trt transcribe-dataset``: the summary as one JSON line on stdout."""
    from .checks import UsageError, require
    from .options import engine_kwargs

    try:
        require("ray", "pyarrow", what="transcribe-dataset")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        summary = transcribe_dataset(
            args.input, args.output, engine_kwargs(args), args.replicas, args.gpus_per_replica,
            args.cpus_per_replica, args.rows_per_batch, args.output_format, args.audio_column, args.id_column,
            args.engine_factory, args.ray_address, progress=not args.no_progress)
    except (DatasetError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # from Ray: an engine that cannot start in its actor (bad model, no memory), a lost cluster
        lines = str(e).strip().splitlines() or [type(e).__name__]
        print(f"error: the job failed: {lines[-1]}", file=sys.stderr)
        return 1
    print(f"{summary.processed} files ({summary.errors} errors, {summary.skipped} done before), "
          f"{summary.audio_seconds:.1f} s of audio in {summary.wall_seconds:.1f} s: RTFx {summary.rtfx}",
          file=sys.stderr)
    print(json.dumps(asdict(summary)))
    return 0
