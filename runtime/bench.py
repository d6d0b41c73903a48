"""RTFx and WER the way the Open ASR Leaderboard measures them (``canary-trt bench``).

    canary-trt bench --manifest librispeech_test_clean.jsonl --manifest ami.jsonl [--model DIR] [--repeats 3]
    python -m runtime.bench --audio-dir recordings/          # RTFx only: no references

One dataset per ``--manifest`` (NeMo JSONL: ``audio_filepath``, ``duration``, ``text``; relative paths are
resolved against the manifest's folder) or ``--audio-dir``. As in the leaderboard's ``run_eval_salm.py``
(huggingface/open_asr_leaderboard, shared spec benchmarks.md):
- not timed: reading the manifest, sorting utterances longest first, loading the model, warm-up (the first
  ``--warmup`` utterances, run once untimed before each dataset);
- timed, per pass over a dataset: from the first submit to the last result, i.e. reading each audio file and
  resampling it (in the submitting thread, like the leaderboard's one-worker data loader), mel features,
  encoder, prompt building, prefill, greedy decode, copying ids to the host, detokenisation;
- RTFx = seconds of audio / seconds timed; composite RTFx = sum of audio / sum of time (not a mean);
- WER after a Whisper English normaliser, scored like the leaderboard's ``score_results``: kaldialign's
  ``batch_error_rate`` with ``merge_compounds=True`` over whitespace-split words. The normaliser is
  ``whisper_normalizer``'s ``EnglishTextNormalizer``: close to, not identical to, the leaderboard's current
  one (which since 2026 also collapses spelled-out acronyms, maps name variants and compounds, and drops more
  fillers), so WERs can differ slightly from the leaderboard's.
Composite WER is given both as the leaderboard's "average WER" (mean of per-dataset WERs) and over all words.
``--repeats`` timed passes per dataset: the median time is the headline, min and max its spread.

Output: one JSON line per run on stdout (and appended to ``--out``), a table on stderr.
``--baseline nemo`` also runs NeMo's own ``SALM.generate`` (HF generate, eager, greedy, static batches of
``--max-batch-size``) on the same data in the same process, timed the same way, its passes alternating with the
engine's; it needs nemo-toolkit, and loads ``--model`` itself (NeMo finds the base LLM's config on its own).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = {".wav", ".flac", ".ogg", ".opus", ".mp3", ".m4a", ".aac", ".webm"}
TIMED = ("per pass: first submit to last result, i.e. reading and resampling each audio file (submitting "
         "thread), mel features, encoder, prompt building, prefill, greedy decode, ids to host, detokenisation; "
         "not timed: manifest parsing, sorting longest first, model loading, warm-up")
NORMALISER = ("whisper_normalizer EnglishTextNormalizer: close to, not identical to, the Open ASR Leaderboard's "
              "2026 normaliser (no acronym collapsing, name-variant or compound mapping, fewer fillers)")
SCORING = "kaldialign batch_error_rate(merge_compounds=True) on whitespace-split normalised words, as the leaderboard"


class ManifestError(ValueError):
    """A manifest or audio folder that cannot be benchmarked; the message names the file and line."""


@dataclass(frozen=True)
class Utterance:
    audio: Path
    duration: float  # seconds, from the manifest or the file header: used for sorting only
    text: str | None  # reference transcript, None when the dataset has none


def machine_name(device="cpu") -> str:
    """The hardware a number was measured on: the GPU's name, or the CPU model with the cores and threads used."""
    import platform

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads (torch {torch.__version__})"


# ---- datasets -------------------------------------------------------------------------------------------------

def _header_duration(path: Path) -> float:
    import soundfile as sf

    try:
        return sf.info(str(path)).duration
    except RuntimeError:  # (LibsndfileError) a format only FFmpeg reads (m4a, webm): decode once, outside the timer
        from runtime.audio import TARGET_RATE, load_audio

        return len(load_audio(path)) / TARGET_RATE


def read_manifest(path: str | os.PathLike) -> list[Utterance]:
    """A NeMo JSONL manifest: one object per line with ``audio_filepath`` (relative: to the manifest's folder),
    ``duration`` (seconds, > 0; read from the file when absent) and ``text`` (all lines or none). Blank lines
    are skipped. Raises ManifestError naming the file and line of the first problem."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: no such manifest")
    items: list[Utterance] = []
    has_text: bool | None = None
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            where = f"{path}:{n}"
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise ManifestError(f"{where}: expected a JSON object, got {type(row).__name__}")
            audio = row.get("audio_filepath")
            if not isinstance(audio, str) or not audio:
                raise ManifestError(f"{where}: missing 'audio_filepath'")
            audio_path = Path(audio) if os.path.isabs(audio) else path.parent / audio
            if not audio_path.is_file():
                raise ManifestError(f"{where}: audio file not found: {audio_path}")
            duration = row.get("duration")
            if duration is None:
                duration = _header_duration(audio_path)
            elif isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
                raise ManifestError(f"{where}: 'duration' must be a positive number of seconds, got {duration!r}")
            text = row.get("text")
            if text is not None and not isinstance(text, str):
                raise ManifestError(f"{where}: 'text' must be a string, got {type(text).__name__}")
            if has_text is not None and has_text != (text is not None):
                raise ManifestError(f"{where}: {'no' if text is None else 'a'} 'text', unlike the lines before: "
                                    f"references must be given for every utterance or for none")
            has_text = text is not None
            items.append(Utterance(audio_path, float(duration), text))
    if not items:
        raise ManifestError(f"{path}: no utterances")
    return items


def read_folder(path: str | os.PathLike) -> list[Utterance]:
    """Every audio file under a folder (by suffix), without references."""
    path = Path(path)
    if not path.is_dir():
        raise ManifestError(f"{path}: no such folder")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())
    if not files:
        raise ManifestError(f"{path}: no audio files ({', '.join(sorted(AUDIO_SUFFIXES))})")
    return [Utterance(p, _header_duration(p), None) for p in files]


def longest_first(items: list[Utterance]) -> list[Utterance]:
    return sorted(items, key=lambda u: -u.duration)  # stable: equal durations keep manifest order


# ---- metrics ----------------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def normaliser():
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


def word_errors(refs: list[str], hyps: list[str]) -> dict:
    """Errors after normalisation, summed over utterances: sub, del, ins, ref_words and wer (percent, None
    without reference words)."""
    from kaldialign import batch_error_rate

    norm = normaliser()
    r = batch_error_rate([norm(x).split() for x in refs], [norm(x).split() for x in hyps], merge_compounds=True)
    words = r["ref_len"]
    return {"sub": r["sub"], "del": r["del"], "ins": r["ins"], "ref_words": words,
            "wer": round(100 * r["total"] / words, 2) if words else None}


def rtfx(audio_s: float, time_s: float) -> float:
    return round(audio_s / time_s, 2)


def composite(datasets: list[dict]) -> dict:
    """Over all datasets: RTFx from summed audio and summed (median) time; WER both as the leaderboard's
    average of per-dataset WERs and over all reference words."""
    audio = sum(d["audio_s"] for d in datasets)
    time_s = sum(d["time_s"]["median"] for d in datasets)
    out = {"audio_s": round(audio, 3), "time_s": round(time_s, 4), "rtfx": rtfx(audio, time_s)}
    scored = [d for d in datasets if d.get("wer") is not None]
    if scored:
        words = sum(d["errors"]["ref_words"] for d in scored)
        errors = sum(d["errors"]["sub"] + d["errors"]["del"] + d["errors"]["ins"] for d in scored)
        out["wer_mean_of_datasets"] = round(statistics.fmean(d["wer"] for d in scored), 2)
        out["wer_all_words"] = round(100 * errors / words, 2) if words else None
    return out


# ---- runs -------------------------------------------------------------------------------------------------------

def timed_passes(transcribers: dict, items: list[Utterance], repeats: int, warmup: int) -> dict:
    """Warm each transcriber up on the first ``warmup`` items (untimed), then ``repeats`` rounds of one timed
    pass over all items by each transcriber in turn, so that a change in machine load between rounds hits
    engine and baseline alike. ``transcribe(paths) -> [(text, token_count, finish_reason, audio seconds)]``.
    Returns {name: (times, results of each pass)}."""
    paths = [u.audio for u in items]
    out = {name: ([], []) for name in transcribers}
    for transcribe in transcribers.values():
        if warmup:
            transcribe(paths[:warmup])
    for _ in range(repeats):
        for name, transcribe in transcribers.items():
            t0 = time.perf_counter()
            result = transcribe(paths)
            out[name][0].append(time.perf_counter() - t0)
            out[name][1].append(result)
    return out


def summarise(name: str, source: str, items: list[Utterance], times: list[float], passes: list) -> dict:
    last = passes[-1]
    audio = sum(r[3] for r in last)
    tokens = sum(r[1] for r in last)
    median = statistics.median(times)
    reasons: dict[str, int] = {}
    for r in last:
        reasons[r[2]] = reasons.get(r[2], 0) + 1
    d = {"name": name, "source": source, "utterances": len(items), "audio_s": round(audio, 3),
         "time_s": {"median": round(median, 4), "min": round(min(times), 4), "max": round(max(times), 4),
                    "all": [round(t, 4) for t in times]},
         "rtfx": rtfx(audio, median), "rtfx_best": rtfx(audio, min(times)), "tokens": tokens,
         "tokens_per_s": round(tokens / median, 1), "finish_reasons": reasons,
         "same_text_every_pass": all([r[0] for r in p] == [r[0] for r in last] for p in passes)}
    if items[0].text is not None:
        e = word_errors([u.text for u in items], [r[0] for r in last])
        d["wer"], d["errors"] = e.pop("wer"), e
    return d


def bench_all(transcribers: dict, datasets: list, repeats: int, warmup: int) -> dict:
    """Every dataset in turn: {transcriber name: [summary per dataset]}; a baseline's summaries also count the
    utterances whose text equals the first transcriber's."""
    out: dict = {name: [] for name in transcribers}
    first = next(iter(transcribers))
    for name, source, items in datasets:
        runs = timed_passes(transcribers, items, repeats, min(warmup, len(items)))
        for who, (times, passes) in runs.items():
            d = summarise(name, source, items, times, passes)
            if who != first:
                ours = [r[0] for r in runs[first][1][-1]]
                d["same_text_as_" + first] = sum(x == r[0] for x, r in zip(ours, passes[-1]))
            out[who].append(d)
    return out


def engine_transcriber(engine, max_new_tokens: int):
    def transcribe(paths):
        return [(r.text, len(r.token_ids), r.finish_reason, r.duration)
                for r in engine.transcribe(paths, max_new_tokens=max_new_tokens)]

    return transcribe


def nemo_transcriber(model_dir: str, device: str, dtype, batch_size: int, max_new_tokens: int):
    """NeMo's SALM.generate as the leaderboard calls it (prompt, GenerationConfig, eos parsing), in batches of
    ``batch_size`` in the given (longest-first) order. Audio is read with canary-trt's reader inside the timer,
    as for the engine, so both pay the same I/O."""
    import torch
    from nemo.collections.speechlm2.models.salm import SALM
    from transformers import GenerationConfig

    from runtime.audio import TARGET_RATE, load_audio

    model = SALM.from_pretrained(model_dir).eval().to(dtype).to(device)
    eos = torch.tensor([model.text_eos_id])
    config = GenerationConfig(max_new_tokens=max_new_tokens, bos_token_id=model.text_bos_id, eos_token_id=eos,
                              pad_token_id=model.text_pad_id)
    prompt = [{"role": "user", "slots": {"message": f"Transcribe the following: {model.audio_locator_tag}"}}]

    @torch.inference_mode()
    def transcribe(paths):
        out = []
        for i in range(0, len(paths), batch_size):
            waves = [torch.from_numpy(load_audio(p)) for p in paths[i : i + batch_size]]
            lens = torch.tensor([len(w) for w in waves])
            audio = torch.nn.utils.rnn.pad_sequence(waves, batch_first=True)
            ids = model.generate(prompts=[prompt] * len(waves), audios=audio.to(device),
                                 audio_lens=lens.to(device), generation_config=config).cpu()
            for w, row in zip(waves, ids):
                end = (row == eos[0]).nonzero()
                row = row[: int(end[0])] if len(end) else row
                reason = "stop" if len(end) else "length"
                out.append((model.tokenizer.ids_to_text(row).strip(), len(row), reason, len(w) / TARGET_RATE))
        return out

    return transcribe


# ---- command line -----------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``canary-trt bench``: datasets, the model and engine (as ``canary-trt serve``), the protocol."""
    from runtime.options import add_engine_arguments

    parser.add_argument("--manifest", action="append", default=[], metavar="FILE",
                        help="NeMo JSONL manifest (audio_filepath, duration, text): one dataset; repeatable")
    parser.add_argument("--audio-dir", action="append", default=[], metavar="DIR",
                        help="folder of audio files, no references (RTFx only): one dataset; repeatable")
    # max_new_tokens: transcribe's default (256), not the leaderboard's 128, which cuts fast 40 s speech short;
    # decoding ends at the end-of-turn token, so the bound only matters for utterances that need more
    add_engine_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per dataset (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="utterances run untimed before each dataset (default: 4 x max batch size, as the "
                             "leaderboard's 4 warm-up batches)")
    parser.add_argument("--baseline", choices=["nemo"], default=None,
                        help="also run NeMo's SALM.generate on the same data in this process (needs nemo-toolkit)")
    parser.add_argument("--out", default=None, metavar="FILE", help="append the JSON line to this file")


def _git_commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], check=False, capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for name in ("canary-trt", "torch", "onnxruntime", "tensorrt", "tensorrt_llm", "nemo_toolkit"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


def _peak_memory(device) -> dict:
    import torch

    out = {"host_peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)}
    if device.type == "cuda":
        out["gpu_peak_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return out


def _table(report: dict) -> str:
    rows = [("dataset", "utts", "audio s", "time s (min-max)", "RTFx", "WER %")]
    for d in report["datasets"]:
        rows.append((d["name"], str(d["utterances"]), f"{d['audio_s']:.1f}",
                     f"{d['time_s']['median']:.3f} ({d['time_s']['min']:.3f}-{d['time_s']['max']:.3f})",
                     f"{d['rtfx']:.2f}", "-" if d.get("wer") is None else f"{d['wer']:.2f}"))
    c = report["composite"]
    rows.append(("composite", str(sum(d["utterances"] for d in report["datasets"])), f"{c['audio_s']:.1f}",
                 f"{c['time_s']:.3f}", f"{c['rtfx']:.2f}",
                 "-" if c.get("wer_mean_of_datasets") is None else f"{c['wer_mean_of_datasets']:.2f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths))) for r in rows]
    b = report.get("baseline")
    lines.append(f"{report['engine']} on {report['device']}, {report['precision']}, encoder "
                 f"{report['backends']['encoder']}, decoder {report['backends']['decoder']}")
    if b:
        lines.append(f"NeMo baseline: RTFx {b['composite']['rtfx']:.2f}; speed-up {report['speedup_vs_baseline']}x "
                     f"(same machine, same run)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """``canary-trt bench``: 0 on success, 1 if a file or request failed, 2 on bad input or a missing baseline."""
    from runtime.engine import Engine
    from runtime.options import engine_kwargs

    try:
        datasets = [(Path(m).stem, str(m), longest_first(read_manifest(m))) for m in args.manifest]
        datasets += [(Path(d).name, str(d), longest_first(read_folder(d))) for d in args.audio_dir]
        if not datasets:
            raise ManifestError("nothing to benchmark: give --manifest FILE or --audio-dir DIR")
        if args.repeats < 1:
            raise ManifestError("--repeats must be >= 1")
    except ManifestError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from runtime.checks import UsageError, check_model_args, model_error, require

    try:  # every missing package is named before the model loads and anything is timed
        check_model_args(args)
        if any(items[0].text is not None for _, _, items in datasets):
            require("kaldialign", "whisper_normalizer", what="WER (manifests with text)")
        if args.baseline == "nemo":
            import importlib.util

            if importlib.util.find_spec("nemo") is None:
                raise UsageError("--baseline nemo needs nemo-toolkit in this environment: pip install "
                                 "'nemo-toolkit[asr]==3.0.0' 'peft<=0.18.0' (README: 'Long-form audio and benchmarks')")
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    kwargs = engine_kwargs(args)
    from runtime.parakeet import is_parakeet

    parakeet = is_parakeet(args.model)  # Parakeet-TDT (issue 14): its engine, NeMo's ASR transcribe as baseline
    try:
        if parakeet:
            from runtime.parakeet import engine_from_args

            engine = engine_from_args(args)
        else:
            engine = Engine.from_pretrained(**kwargs)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"error: {model_error(args, e)}", file=sys.stderr)
        return 2
    o = engine.options
    warmup = 4 * o.max_batch_size if args.warmup is None else args.warmup
    device, dtype = engine.model.device, engine.model.dtype
    transcribers = {"canary-trt": engine_transcriber(engine, args.max_new_tokens)}
    try:
        if args.baseline == "nemo":
            import contextlib

            with contextlib.redirect_stdout(sys.stderr):  # NeMo logs to stdout, which carries only the JSON line
                if parakeet:
                    from runtime.parakeet import nemo_transcriber as parakeet_nemo

                    transcribers["nemo"] = parakeet_nemo(str(args.model), str(device), o.max_batch_size)
                else:
                    transcribers["nemo"] = nemo_transcriber(str(args.model), str(device), dtype, o.max_batch_size,
                                                            args.max_new_tokens)
        runs = bench_all(transcribers, datasets, args.repeats, warmup)
    except (ValueError, RuntimeError) as e:  # an undecodable file (AudioError), a failed request
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        engine.close()
    results = runs["canary-trt"]
    report = {
        "benchmark": "rtfx", "engine": "canary-trt", "git_commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": str(args.model),
        "device": machine_name(device), "precision": str(dtype).replace("torch.", ""),
        "backends": {"frontend": "torch", "encoder": getattr(engine.encoder, "name", type(engine.encoder).__name__),
                     "decoder": getattr(engine.decoder, "name", type(engine.decoder).__name__),
                     "cuda_graphs": o.cuda_graphs and device.type == "cuda"},
        "batch_policy": f"in-flight batching, max_batch_size={o.max_batch_size}, max_prefill_tokens="
                        f"{getattr(o, 'max_prefill_tokens', None)}; utterances submitted longest first "
                        f"(Engine.transcribe: up to "
                        f"max_queue={o.max_queue} waiting)",
        "decoding": f"greedy, max_new_tokens={args.max_new_tokens}", "warmup_utterances": warmup,
        "repeats": args.repeats, "timed": TIMED, "normaliser": NORMALISER, "scoring": SCORING,
        "versions": _versions(), "datasets": results, "composite": composite(results),
        "memory": _peak_memory(device), "baseline": None,
    }
    if "nemo" in runs:
        report["baseline"] = {"engine": "NeMo SALM.generate (HF generate, eager, greedy)",
                              "batch_policy": f"static batches of {o.max_batch_size}, longest first",
                              "precision": str(dtype).replace("torch.", ""), "datasets": runs["nemo"],
                              "composite": composite(runs["nemo"]),
                              "timing": "passes alternate with canary-trt's, same data, same process"}
        report["speedup_vs_baseline"] = round(report["composite"]["rtfx"] / report["baseline"]["composite"]["rtfx"], 2)
    if parakeet:
        report.update(engine="canary-trt (Parakeet-TDT)", decoding="greedy TDT, max_symbols "
                      f"{engine.model.cfg.max_symbols}", batch_policy=f"length-sorted batches of up to "
                      f"{o.max_batch_size} (max_batch_seconds={o.max_batch_seconds}, max_padding={o.max_padding})")
        report["backends"].update(encoder=getattr(engine.encoder, "name", "torch"), decoder="torch greedy TDT")
        if report["baseline"]:
            report["baseline"].update(engine="NeMo EncDecRNNTBPEModel.transcribe (greedy_batch)",
                                      batch_policy=f"transcribe(batch_size={o.max_batch_size}), longest first")
    line = json.dumps(report, ensure_ascii=False)
    print(line)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    print(_table(report), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="canary-trt bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
