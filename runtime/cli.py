"""``canary-trt`` command line: transcribe, check-encoder, serve, triton-repo, bench, bench-serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.checkpoint import DEFAULT_MODEL

from .checks import UsageError, check_model_args, model_error, require
from .options import add_engine_arguments, engine_kwargs


def build_parser() -> argparse.ArgumentParser:
    from . import bench, bench_serve, dataset, longform, server
    from .triton import repository

    parser = argparse.ArgumentParser(prog="canary-trt", description="Fast, exact Canary-Qwen-2.5B inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and warnings")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="transcribe audio files, folders of them, or NeMo manifests")
    t.add_argument("files", nargs="*", metavar="PATH",
                   help="audio files (wav, flac, ogg, mp3, m4a, ...) or folders (their audio files, sorted by path)")
    t.add_argument("--manifest", action="append", default=[], metavar="FILE",
                   help="NeMo JSONL manifest (audio_filepath; relative to the manifest's folder): its audio; repeatable")
    add_engine_arguments(t)
    t.add_argument("--output-format", choices=list(OUTPUT_FORMATS), default="text",
                   help="text: one transcript per line (prefixed by the file name when several files); "
                        "jsonl: one JSON object per file; json/srt/vtt: timestamped segments (long-form)")
    t.add_argument("--output-dir", default=None, metavar="DIR",
                   help="write one file per input here (FILE.txt|.json|.srt|.vtt; a folder's layout is kept) "
                        "instead of stdout; needed for json/srt/vtt with several inputs")
    t.add_argument("--output-manifest", default=None, metavar="FILE",
                   help="write a NeMo manifest: each input's row (or audio_filepath, duration) with pred_text")
    t.add_argument("--overwrite", action="store_true", help="replace output files that exist (default: refuse)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (shown only when stderr is a TTY)")
    longform.add_arguments(t)
    t.set_defaults(func=transcribe)
    c = sub.add_parser("check-encoder", help="compare an ONNX/TensorRT encoder with the torch reference")
    c.add_argument("files", nargs="+", metavar="FILE", help="audio files; mixed lengths make padded batches")
    c.add_argument("--model", default=DEFAULT_MODEL, help="hub id or folder of the release (default: %(default)s)")
    c.add_argument("--llm", default=None, help="base LLM hub id or folder (its config only: the LLM is not loaded)")
    c.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when present)")
    c.add_argument("--artifacts", required=True, metavar="DIR", help="encoder artifacts (build/export_encoder.py)")
    c.add_argument("--backend", choices=["onnx", "tensorrt"], required=True)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--min-cosine", type=float, default=0.999,
                   help="exit code 1 if an utterance's cosine similarity is below this (default: %(default)s)")
    c.set_defaults(func=check_encoder)
    # Subcommands whose modules bring their own arguments and runner.
    for name, module, text in (
            ("serve", server, "OpenAI-compatible transcription server"),
            ("triton-repo", repository, "write a Triton Inference Server model repository"),
            ("bench", bench, "RTFx and WER on manifests, as the Open ASR Leaderboard measures them"),
            ("bench-serve", bench_serve, "load test of a running server: latency, TTFT, throughput"),
            ("transcribe-dataset", dataset, "transcribe a corpus on a Ray cluster (Ray Data, resumable)")):
        p = sub.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)
    return parser


OUTPUT_FORMATS = ("text", "jsonl", "json", "srt", "vtt")
SUFFIXES = {"text": ".txt", "json": ".json", "srt": ".srt", "vtt": ".vtt"}  # --output-dir files
class Interrupt:
    """Ctrl-C for a running transcription: the first SIGINT asks the work to stop (``requested``; ``wake`` is
    called, from the signal handler, so a waiting loop notices), a second one exits at once with 130."""

    def __init__(self, wake=None):
        self.requested, self.wake, self._old = False, wake, None

    def __enter__(self):
        import signal

        self._old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        import os

        if self.requested:
            os._exit(130)
        self.requested = True
        print("\ninterrupted: cancelling; finished results are kept (Ctrl-C again to quit at once)",
              file=sys.stderr, flush=True)
        if self.wake is not None:
            self.wake()

    def __exit__(self, *exc):
        import signal

        signal.signal(signal.SIGINT, self._old)


def collect_inputs(args: argparse.Namespace) -> list[tuple]:
    """(audio path, manifest row or None, path relative to its folder argument) for every input, in order:
    files as given, folders' audio files sorted by path, manifests' rows in order. UsageError naming the
    first path that is missing or empty."""
    import os
    from pathlib import Path

    from .bench import AUDIO_SUFFIXES

    items = []
    for f in args.files:
        p = Path(f)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix.lower() in AUDIO_SUFFIXES and q.is_file())
            if not found:
                raise UsageError(f"{f}: a folder with no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
            items += [(str(q), None, q.relative_to(p)) for q in found]
        elif p.is_file():
            items.append((f, None, Path(p.name)))
        else:
            raise UsageError(f"{f}: no such file or folder")
    for m in args.manifest:
        mp = Path(m)
        if not mp.is_file():
            raise UsageError(f"{m}: no such manifest")
        with mp.open(encoding="utf-8") as fh:
            for n, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UsageError(f"{m}:{n}: not valid JSON ({e.msg})") from None
                audio = row.get("audio_filepath") if isinstance(row, dict) else None
                if not isinstance(audio, str) or not audio:
                    raise UsageError(f"{m}:{n}: no 'audio_filepath'")
                path = Path(audio) if os.path.isabs(audio) or not (mp.parent / audio).exists() else mp.parent / audio
                if not path.is_file():
                    raise UsageError(f"{m}:{n}: audio file not found: {path}")
                items.append((str(path), row, Path(Path(audio).name)))
    if not items:
        raise UsageError("nothing to transcribe: give audio files, folders or --manifest FILE")
    return items


def plan_outputs(args: argparse.Namespace, items: list[tuple], long: bool) -> list:
    """The file each input's transcript goes to (None: stdout), checked before any work: never over an
    existing file without --overwrite, never two inputs into one file."""
    from pathlib import Path

    fmt = args.output_format
    if args.output_dir is None:
        if long and fmt != "text" and len(items) > 1:
            raise UsageError(f"{len(items)} inputs in {fmt}: give --output-dir DIR (one file per input)")
        outputs = [None] * len(items)
    else:
        if fmt == "jsonl":
            raise UsageError("--output-dir writes one file per input: choose --output-format text, json, srt or "
                             "vtt (jsonl is one stream on stdout)")
        outputs, seen = [], {}
        for path, _, rel in items:
            out = Path(args.output_dir) / rel.with_suffix(SUFFIXES[fmt])
            if out in seen:
                raise UsageError(f"{seen[out]} and {path} would both be written to {out}")
            seen[out] = path
            outputs.append(out)
    targets = [o for o in outputs if o is not None] + ([Path(args.output_manifest)] if args.output_manifest else [])
    existing = [str(o) for o in targets if o.exists()]
    if existing and not args.overwrite:
        raise UsageError(f"{existing[0]} exists{f' (and {len(existing) - 1} more)' if len(existing) > 1 else ''}: "
                         f"pass --overwrite to replace, or choose another --output-dir")
    return outputs


def _progress(args, total: int | None, unit: str, desc: str | None = None):
    """A tqdm bar on stderr when it is a terminal (and not --no-progress), else None."""
    if args.no_progress or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit=unit, desc=desc, file=sys.stderr, leave=False)


def _pump(run, events, interrupt: Interrupt) -> None:
    """Drive an InOrder run from this thread: its bookkeeping arrives on ``events``; a Ctrl-C cancels it."""
    run.start()
    while True:
        item = events.get()
        if item is None:
            return
        if item == "interrupt":
            run.cancel()
            continue
        fn, a = item
        fn(*a)


def transcribe(args: argparse.Namespace) -> int:
    """Every input goes through the in-flight engine; results are written in input order as they complete. An
    input that fails is reported by name and the others go on (exit code 1). Long-form (any length, VAD
    segments, timestamps) when asked for or when a timestamped format is. Ctrl-C: what is done is written,
    the rest cancelled, exit code 130 (a second Ctrl-C quits at once)."""
    import queue

    from . import longform
    from .audio import quiet_decoder_logs
    from .engine import Engine

    from .parakeet import engine_from_args, is_parakeet

    parakeet = is_parakeet(args.model)  # Parakeet-TDT: its own engine, with word and segment timestamps
    long = args.long_form or args.output_format in longform.LONG_FORMATS
    try:
        items = collect_inputs(args)
        outputs = plan_outputs(args, items, long)
        check_model_args(args)
        if long and args.vad == "silero":
            require("silero_vad", "onnxruntime", what="--vad silero")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if parakeet:
            engine = engine_from_args(args)
        else:
            kwargs = engine_kwargs(args)
            if long:  # room for the longest segment: 12.5 audio frames per second, the prompt and the new tokens
                kwargs["max_seq_len"] = max(kwargs["max_seq_len"], int(args.max_segment_seconds * 12.5) + 64 +
                                            kwargs["max_new_tokens"])
            engine = Engine.from_pretrained(**kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"error: {model_error(args, e)}", file=sys.stderr)
        return 2
    events = queue.SimpleQueue()  # put() may be called from a signal handler
    writer = _Writer(args, items, outputs)
    restore = quiet_decoder_logs()
    try:
        with Interrupt(wake=lambda: events.put("interrupt")) as interrupt:
            if long:
                _transcribe_long(args, engine, items, writer, events, interrupt)
            else:
                _transcribe_short(args, engine, items, writer, events, interrupt)
    finally:
        engine.close()
        writer.close()
        restore()
    if interrupt.requested:
        print(f"interrupted: {writer.done} of {len(items)} inputs transcribed", file=sys.stderr)
        return 130
    return 1 if writer.errors else 0


def _transcribe_short(args, engine, items, writer, events, interrupt) -> None:
    from .longform import InOrder

    bar = _progress(args, len(items), "file") if len(items) > 1 else None

    def on_item(i, r):
        writer.write(i, r)
        if bar is not None:
            bar.update()

    run = InOrder(lambda item, cb: engine.submit(item[0], on_delta=cb), items, engine.options.max_queue, on_item,
                  lambda: events.put(None), call=lambda fn, *a: events.put((fn, a)))
    _pump(run, events, interrupt)
    if bar is not None:
        bar.close()


def _transcribe_long(args, engine, items, writer, events, interrupt) -> None:
    """One input after another, each cut at pauses into segments that go through the engine together."""
    from .audio import AudioError, TARGET_RATE, load_audio
    from .longform import (InOrder, LongTranscription, cut_points, join_texts, model_timestamps, segments_from,
                           speech_scores)
    from .parakeet import ParakeetEngine

    for i, (path, _, _) in enumerate(items):
        if interrupt.requested:
            return
        try:
            wave = load_audio(path)
            score, vad = speech_scores(wave, args.vad)
            cuts = cut_points(score, len(wave), args.max_segment_seconds)
        except (AudioError, ValueError, RuntimeError) as e:
            writer.write(i, e)
            continue
        bar = _progress(args, len(cuts), "segment", desc=path)
        results, failure = [], []

        def on_item(j, r, bar=bar):
            if isinstance(r, BaseException):
                failure.append(r)
                run.cancel()
                return
            results.append(r)
            if bar is not None:
                bar.update()

        run = InOrder(lambda piece, cb: engine.submit(piece, TARGET_RATE, on_delta=cb), [wave[a:b] for a, b in cuts],
                      2 * engine.options.max_batch_size, on_item, lambda: events.put(None),
                      call=lambda fn, *a: events.put((fn, a)))
        if interrupt.requested:
            return
        _pump(run, events, interrupt)
        if bar is not None:
            bar.close()
        if interrupt.requested:
            return  # this input is incomplete: not written
        if failure:
            writer.write(i, failure[0])
            continue
        if isinstance(engine, ParakeetEngine):  # the model's own sentence segments and words
            segments, words = model_timestamps(cuts, results, score)
        else:
            segments, words = segments_from(cuts, results, score), None
        writer.write(i, LongTranscription(join_texts(s.text for s in segments), segments, len(wave) / TARGET_RATE,
                                          vad, words))


class _Writer:
    """Writes each input's result as it comes (stdout, --output-dir files, --output-manifest rows) and counts."""

    def __init__(self, args, items, outputs):
        self.args, self.items, self.outputs = args, items, outputs
        self.done = self.errors = 0
        self.manifest = None
        if args.output_manifest:
            from pathlib import Path

            Path(args.output_manifest).parent.mkdir(parents=True, exist_ok=True)
            self.manifest = open(args.output_manifest, "w", encoding="utf-8")

    def write(self, i: int, r) -> None:
        from .longform import LongTranscription, to_json, to_srt, to_vtt

        path, row, _ = self.items[i]
        fmt, out, several = self.args.output_format, self.outputs[i], len(self.items) > 1
        if isinstance(r, BaseException):
            self.errors += 1
            msg = str(r) if path in str(r) else f"{path}: {r}"
            print(f"error: {msg}", file=sys.stderr, flush=True)
            if fmt == "jsonl" and out is None:
                print(json.dumps({"audio": path, "error": msg}, ensure_ascii=False), flush=True)
            if self.manifest is not None:
                self._row(row, path, None, {"pred_text": "", "error": msg})
            return
        self.done += 1
        long = isinstance(r, LongTranscription)
        if fmt == "jsonl":
            body = ({"audio": path, **r.as_dict()} if long else
                    {"audio": path, "text": r.text, "token_ids": r.token_ids, "duration": round(r.duration, 4),
                     "finish_reason": r.finish_reason})
            if not long and "words" in r.extra:  # Parakeet-TDT: word and segment timestamps
                from .parakeet import segment_fields, word_fields

                body.update(words=word_fields(r.extra["words"]), segments=segment_fields(r.extra["segments"]))
            print(json.dumps(body, ensure_ascii=False), flush=True)
        elif fmt == "text" and out is None:
            print(r.text if not several else f"{path}\t{r.text}", flush=True)
        else:
            body = {"text": lambda t: t.text + "\n", "json": lambda t: to_json(t) + "\n", "srt": to_srt,
                    "vtt": to_vtt}[fmt](r)
            if out is None:
                sys.stdout.write(body)
                sys.stdout.flush()
            else:
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(body, encoding="utf-8")
                print(f"{path}\t{out}", file=sys.stderr, flush=True)
        if self.manifest is not None:
            self._row(row, path, r.duration, {"pred_text": r.text})

    def _row(self, row, path, duration, extra) -> None:
        base = dict(row) if row is not None else {"audio_filepath": path,
                                                  **({"duration": round(duration, 4)} if duration else {})}
        self.manifest.write(json.dumps({**base, **extra}, ensure_ascii=False) + "\n")
        self.manifest.flush()

    def close(self) -> None:
        if self.manifest is not None:
            self.manifest.close()


def check_encoder(args: argparse.Namespace) -> int:
    """Per utterance: max abs error, relative error and cosine of the backend's embeddings vs the torch
    float32 encoder, both run as length-bucketed padded batches of ``--batch-size``."""
    import torch

    from engine.backends.encoder import open_encoder
    from engine.backends.encoder_torch import TorchEncoder
    from engine.checkpoint import resolve
    from engine.export.onnx import load_perception

    from .common import pick_device
    from .audio import AudioError, load_audio

    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        from .parakeet import is_parakeet

        if is_parakeet(args.model):  # Parakeet-TDT (issue 14): encoder + joint.enc projection, as exported
            from engine.export.tdt_onnx import load_tdt_perception

            perception, weights = load_tdt_perception(args.model)
        else:
            files = resolve(args.model, args.llm)
            perception, weights = load_perception(files), files.weights  # float32, without the LLM
        dev = pick_device(args.device)
        perception = perception.to(dev)
        backend = open_encoder(args.backend, perception, weights, args.artifacts, dev, torch.float32,
                               args.batch_size)
        waves = [load_audio(f) for f in args.files]
        got = backend.encode(waves)  # raises for audio longer than the artifacts take
    except (OSError, ValueError, RuntimeError, AudioError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reference = TorchEncoder(perception, args.batch_size).encode(waves)
    worst_cos, ok = 1.0, True
    print(f"# {args.backend} ({getattr(backend, 'precision', '?')}) vs torch float32 on {dev}")
    print("file\tframes\tmax_abs_err\trel_err\tcosine")
    for f, ref, out in zip(args.files, reference, got):
        if out.shape != ref.shape:
            print(f"{f}\tshape {tuple(out.shape)} != {tuple(ref.shape)}")
            ok = False
            continue
        a, b = out.double().flatten(), ref.double().flatten()
        err = (a - b).abs().max().item()
        cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        worst_cos = min(worst_cos, cos)
        print(f"{f}\t{ref.shape[0]}\t{err:.3e}\t{err / b.abs().max().item():.3e}\t{cos:.7f}")
    ok = ok and worst_cos >= args.min_cosine
    print(f"# {'ok' if ok else 'FAILED'}: worst cosine {worst_cos:.7f} (threshold {args.min_cosine})")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside a transcription loop (loading the model, ...): no traceback
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
