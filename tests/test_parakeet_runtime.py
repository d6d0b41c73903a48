"""runtime/parakeet.py: ParakeetEngine's front door (submit/result/map/stream/cancel/close, bounded queue) and the
CLI branch, against NeMo's single-utterance goldens of tests/fixtures/tdt-tiny."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from test_parakeet import NEMO, ROOT, audio, model, utterances
from runtime.engine import EngineClosed
from runtime.parakeet import ParakeetEngine, ParakeetOptions, is_parakeet
from runtime.scheduler import QueueFull

WORD_KEYS = ("word", "start_offset", "end_offset", "start", "end")
SEGMENT_KEYS = ("segment", "start_offset", "end_offset", "start", "end")


def engine(threaded=False, **options) -> ParakeetEngine:
    net, tok = model()
    return ParakeetEngine(net, tok, ParakeetOptions(**options), threaded=threaded)


def paths() -> list[str]:
    return [str(ROOT / u["file"]) for u in utterances()]


def check(result, u: dict) -> None:
    ts = u["transcribe_single_timestamps"]
    assert result.text == ts["text"] and result.token_ids == ts["token_ids"]
    assert result.finish_reason == "stop" and result.duration == pytest.approx(u["duration_s"])
    assert result.extra["timesteps"] == ts["timestep"] and result.extra["durations"] == ts["token_duration"]
    assert [{k: w[k] for k in WORD_KEYS} for w in result.extra["words"]] == ts["word"]
    assert [{k: s[k] for k in SEGMENT_KEYS} for s in result.extra["segments"]] == ts["segment"]


@pytest.mark.parametrize("max_batch_seconds", [1280.0, 3.0])  # one length-sorted batch, or several
def test_batched_results_match_nemo_single(max_batch_seconds):
    e = engine(max_batch_seconds=max_batch_seconds)
    handles = [e.submit(p) for p in paths()]
    e.step()  # one step takes every waiting request
    assert all(h.done() for h in handles)
    for h, u in zip(handles, utterances()):
        check(h.result(0), u)
    e.close()


def test_threaded_map_keeps_input_order_and_reports_bad_inputs():
    with engine(threaded=True, max_batch_size=2) as e:
        inputs = paths() + ["no/such.wav"] + [audio(utterances()[0]).numpy()]
        results = list(e.map(inputs, sample_rate=None))
    assert [x for x, _ in results][:-1] == inputs[:-1]
    for (_, r), u in zip(results, utterances()):
        check(r, u)
    assert isinstance(results[-2][1], ValueError) and "no/such.wav" in str(results[-2][1])
    assert isinstance(results[-1][1], ValueError) and "sample_rate" in str(results[-1][1])  # an array needs its rate


def test_array_input_and_stream():
    u = utterances()[1]
    with engine(threaded=True) as e:
        r = e.submit(audio(u).numpy(), sample_rate=16000).result(timeout=60)
        check(r, u)

        async def collect():
            return [d async for d in e.stream(paths()[1])]

        assert "".join(asyncio.run(collect())) == u["single"]["text"]


def test_cancel_queue_bound_and_close():
    e = engine(max_queue=2)
    a, b = e.submit(paths()[0]), e.submit(paths()[1])
    with pytest.raises(QueueFull):
        e.submit(paths()[2])
    b.cancel()
    e.step()
    assert b.result(0).finish_reason == "cancelled" and b.result(0).text == ""
    check(a.result(0), utterances()[0])
    c = e.submit(paths()[2])  # room again
    e.close()  # finishes what was accepted
    check(c.result(0), utterances()[2])
    with pytest.raises(EngineClosed):
        e.submit(paths()[0])


def test_too_long_audio_points_to_long_form():
    e = engine(max_audio_seconds=1.0)
    with pytest.raises(ValueError, match="transcribe_long"):
        e.submit(paths()[4])  # 8.1 s
    e.close()


def test_long_form_offsets_every_piece():
    """Two utterances with 2 s of silence between them, cut at the pause: each piece's words are that piece's
    own transcription shifted by its start in the file."""
    from runtime.longform import plan_segments

    u1, u3 = utterances()[1], utterances()[3]
    gap = np.zeros(32000, np.float32)
    wave = np.concatenate([audio(u1).numpy(), gap, audio(u3).numpy()])
    cuts, _ = plan_segments(wave, 3.0, "energy")
    assert len(cuts) == 2
    with engine(threaded=True) as e:
        long, words = e.transcribe_long(wave, 16000, max_segment_s=3.0, vad="energy")
        pieces = [e.submit(wave[a:b], 16000).result() for a, b in cuts]
    expected = [{"word": w["word"], "start": w["start"] + a / 16000, "end": w["end"] + a / 16000}
                for (a, _), r in zip(cuts, pieces) for w in r.extra["words"]]
    assert words == expected and words
    assert [s.text for s in long.segments] == [s["segment"] for r in pieces for s in r.extra["segments"]]
    assert long.text == " ".join(r.text for r in pieces)
    assert long.segments[-1].start >= cuts[1][0] / 16000 > long.segments[0].end - 1.0
    assert sum(len(s.token_ids) for s in long.segments) == sum(len(r.token_ids) for r in pieces)


def test_family_detection_for_the_cli():
    assert is_parakeet(str(NEMO))
    assert not is_parakeet(str(ROOT.parent / "tiny-canary-qwen" / "model"))
    assert not is_parakeet("no/such-model-offline")  # left to the Canary-Qwen loader, which names the problem


def test_cli_jsonl_and_srt(capsys):
    from runtime.cli import main

    files = paths()[:2]
    rc = main(["transcribe", "--model", str(NEMO), "--device", "cpu", "--output-format", "jsonl", *files])
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(lines) == 2
    for line, u in zip(lines, utterances()):
        ts = u["transcribe_single_timestamps"]
        assert (line["text"], line["token_ids"], line["finish_reason"]) == (ts["text"], ts["token_ids"], "stop")
        assert line["words"] == [{k: w[k] for k in ("word", "start", "end")} for w in ts["word"]]
        assert line["segments"] == [{k: s[k] for k in ("segment", "start", "end")} for s in ts["segment"]]
    rc = main(["transcribe", "--model", str(NEMO), "--device", "cpu", "--output-format", "srt", "--vad", "none",
               "--max-segment-seconds", "20", paths()[2]])
    out = capsys.readouterr().out
    seg = utterances()[2]["transcribe_single_timestamps"]["segment"]
    from runtime.longform import timestamp

    assert rc == 0 and out.startswith(f"1\n00:00:00,000 --> {timestamp(seg[0]['end'], ',')}\n{seg[0]['segment']}\n")
    assert out.count(" --> ") == len(seg)


def test_cli_folder_output_dir_and_manifest_out(tmp_path, capsys):
    """The one CLI path serves Parakeet too: a folder in, one json file per input with NeMo's words, a manifest
    out with pred_text; an existing output is never overwritten without --overwrite."""
    from runtime.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    us = utterances()[:2]
    for u in us:
        (folder / Path(u["file"]).name).write_bytes((ROOT / u["file"]).read_bytes())
    args = ["transcribe", "--model", str(NEMO), "--device", "cpu", "--output-format", "json", "--vad", "none",
            "--output-dir", str(tmp_path / "out"), "--output-manifest", str(tmp_path / "pred.jsonl"), str(folder)]
    assert main(args) == 0
    rows = [json.loads(x) for x in (tmp_path / "pred.jsonl").read_text().splitlines()]
    for u, row in zip(sorted(us, key=lambda u: Path(u["file"]).name), rows):
        ts = u["transcribe_single_timestamps"]
        body = json.loads((tmp_path / "out" / Path(u["file"]).with_suffix(".json").name).read_text())
        assert body["text"] == row["pred_text"] == ts["text"].strip()
        assert [w["word"] for w in body["words"]] == [w["word"] for w in ts["word"]]
        assert [w["start"] for w in body["words"]] == [round(w["start"], 3) for w in ts["word"]]
    capsys.readouterr()
    assert main(args) == 2 and "pass --overwrite" in capsys.readouterr().err


def test_gpu_check_entry_point_small_on_cpu(monkeypatch):
    """benchmarks/gpu_check.py's "parakeet" part: benchmarks/parakeet_gpu.py's benchmark(device=..., small=...)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from parakeet_gpu import benchmark

    r = benchmark(device="cpu", small=True)
    assert [row["max_batch_size"] for row in r["rows"]] == [4, 8]
    assert all(row["rtfx"] > 0 and row["tokens"] > 0 for row in r["rows"])
    assert r["rows"][0]["tokens"] == r["rows"][1]["tokens"]  # batch composition changes nothing
    assert r["single_stream"]["latency_s_median"] > 0
    assert r["graphs_vs_eager"]["cuda_graphs"] is False and r["graphs_vs_eager"]["same_tokens"] == "12/12"


def test_bench_command_takes_a_parakeet_nemo(capsys):
    """``canary-trt bench --model <.nemo>`` times the Parakeet engine (the NeMo baseline needs NeMo installed)."""
    from runtime.cli import main

    rc = main(["bench", "--model", str(NEMO), "--audio-dir", str(ROOT / "audio"), "--device", "cpu",
               "--repeats", "1", "--warmup", "1"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and report["engine"] == "canary-trt (Parakeet-TDT)"
    d = report["datasets"][0]
    assert d["utterances"] == 5 and d["rtfx"] > 0 and d["finish_reasons"] == {"stop": 5}
    assert d["tokens"] == sum(len(u["single"]["token_ids"]) for u in utterances())
