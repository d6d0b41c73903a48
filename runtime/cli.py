"""``canary-trt`` command line: transcribe, check-encoder, serve, triton-repo, bench, bench-serve."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engine.checkpoint import DEFAULT_MODEL

from .options import add_engine_arguments, add_model_arguments, engine_kwargs


def build_parser() -> argparse.ArgumentParser:
    from . import bench, bench_serve, dataset, longform, server
    from .triton import repository

    parser = argparse.ArgumentParser(prog="canary-trt", description="Fast, exact Canary-Qwen-2.5B inference.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress and warnings")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transcribe", help="transcribe audio files")
    t.add_argument("files", nargs="+", metavar="FILE", help="audio files (wav, flac, ogg, mp3, ...)")
    add_engine_arguments(t)
    t.add_argument("--output-format", choices=list(longform.OUTPUT_FORMATS), default="text",
                   help="text: one transcript per line (prefixed by the file name when several files); "
                        "jsonl: one JSON object per file; json/srt/vtt: timestamped segments (long-form)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
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


def transcribe(args: argparse.Namespace) -> int:
    """Every file goes through the in-flight engine; results print in input order as they complete. A file
    that fails is reported by name and the others go on; the exit code is then 1. Long-form (any length,
    VAD segments, timestamps) when asked for or when a timestamped format is."""
    from . import longform
    from .engine import Engine

    if args.long_form or args.output_format in ("json", "srt", "vtt"):
        return longform.run(args)

    try:
        engine = Engine.from_pretrained(**engine_kwargs(args))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: cannot load the model: {e}", file=sys.stderr)
        return 2
    bar = None
    if not args.no_progress and (len(args.files) > 1 and sys.stderr.isatty() or len(args.files) > 64):
        from tqdm import tqdm

        bar = tqdm(total=len(args.files), unit="file", file=sys.stderr)
    errors = 0
    with engine:
        for f, r in engine.map(args.files):
            if bar:
                bar.update()
            if isinstance(r, Exception):
                errors += 1
                msg = str(r) if str(f) in str(r) else f"{f}: {r}"
                print(f"error: {msg}", file=sys.stderr)
                if args.output_format == "jsonl":
                    print(json.dumps({"audio": f, "error": msg}, ensure_ascii=False), flush=True)
            elif args.output_format == "jsonl":
                print(json.dumps({"audio": f, "text": r.text, "token_ids": r.token_ids,
                                  "duration": round(r.duration, 4), "finish_reason": r.finish_reason},
                                 ensure_ascii=False), flush=True)
            else:
                print(r.text if len(args.files) == 1 else f"{f}\t{r.text}", flush=True)
    if bar:
        bar.close()
    return 1 if errors else 0


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
        files = resolve(args.model, args.llm)
        dev = pick_device(args.device)
        perception = load_perception(files).to(dev)  # float32, without the LLM
        backend = open_encoder(args.backend, perception, files.weights, args.artifacts, dev, torch.float32,
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
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
