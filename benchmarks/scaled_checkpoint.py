"""Write the checkpoint of issue 17's CPU run against NeMo: release widths, 4 encoder and 4 LLM layers.

    python benchmarks/scaled_checkpoint.py /tmp/scaled --hf-cache /tmp/hfcache

Writes, seeded (a rerun writes the same bytes):
- ``OUT/model``: config.json + model.safetensors (bf16, release key names) of a random Canary-Qwen at the
  release widths: encoder d_model 1024 with the release's encoder settings, Qwen3-1.7B widths with the full
  151,936 vocabulary, LoRA r=128 / alpha 256 on q_proj and v_proj; 4 encoder and 4 LLM layers;
- ``OUT/llm``: the base LLM's config.json and the real Qwen3 tokenizer (tests/fixtures/qwen3-tokenizer);
- ``OUT/audio`` + ``OUT/manifest.jsonl``: 16 clips of 2 to 20 s, each the fixture utterances one after
  another with short pauses, padded with silence to its target duration; the manifest's text is the
  utterances' transcripts;
- with ``--hf-cache DIR``: ``OUT/llm`` as the hub repo ``config.json:pretrained_llm`` in a Hugging Face hub
  cache, so that NeMo's SALM (which resolves the base LLM by name) loads the folder with HF_HUB_OFFLINE=1
  and HF_HUB_CACHE=DIR.

Weights come from tests/tiny_checkpoint.py's writer (the same on-disk format the loader tests use), with
fan-in-scaled random values, so activations stay O(1), and a final norm gain of random sign, so that greedy
decoding does not just repeat the prompt's last token. With 151,936 tokens eos is rare: every clip runs to
``--max-new-tokens``, so both engines do the same number of decode steps.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from tiny_checkpoint import llm_config, release_tensors, salm_config  # noqa: E402

FIXTURES = ROOT / "tests" / "fixtures"
TOKENIZER = FIXTURES / "qwen3-tokenizer"
UTTERANCES = ROOT / "benchmarks" / "manifests" / "tiny_fixture.jsonl"  # the fixture's 5 clips with transcripts
LLM_NAME = "canary-trt-bench/qwen3-1.7b-widths-4-layers"  # not Qwen/Qwen3-1.7B: a cache entry must not pose as it
SNAPSHOT = "0" * 40  # the commit name of the single cache snapshot
RATE = 16000
PAUSE_S = 0.3
DURATIONS = [round(2 + 18 * i / 15, 2) for i in range(16)]  # 2.0, 3.2, ..., 20.0 s: 176 s in all


def configs(layers: int = 4) -> tuple[dict, dict]:
    """(SALM config, Qwen3 config): the release's (shared spec model.md, sections 1 and 3) with ``layers``
    encoder and LLM layers."""
    enc = dict(n_layers=layers, d_model=1024, n_heads=8, subsampling_conv_channels=256)
    lora = {"r": 128, "lora_alpha": 256, "lora_dropout": 0.01, "target_modules": ["q_proj", "v_proj"],
            "task_type": "CAUSAL_LM"}
    llm = llm_config(vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=layers,
                     num_attention_heads=16, num_key_value_heads=8, head_dim=128, rope_theta=1000000,
                     max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645)
    salm = salm_config(enc, lora, 128, llm["hidden_size"], LLM_NAME)
    # NeMo's SALM would otherwise fetch canary-1b-flash and Qwen3-1.7B weights; the weights are all in model/.
    salm |= {"pretrained_weights": False, "pretrained_asr": "nvidia/canary-1b-flash",
             # NeMo's LoRA install asserts these training-time fields (values as in the release)
             "freeze_params": ["^llm\\..+$", "^embed_tokens\\..+$"], "prevent_freeze_params": ["^.+\\.lora_.+$"]}
    return salm, llm


def write_model(out: Path, layers: int, seed: int) -> None:
    salm, llm = configs(layers)
    model_dir, llm_dir = out / "model", out / "llm"
    model_dir.mkdir(parents=True)
    llm_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(salm, indent=1))
    tensors = release_tensors(salm, llm, seed)
    # A random LLM with tied embeddings echoes its last input token (here "\n" for ever); random signs on the
    # final norm's gain break that attractor (as the NeMo goldens' recipe does), so the ids vary like text.
    g = torch.Generator().manual_seed(1000 * seed + 7)
    tensors["llm.base_model.model.model.norm.weight"] = torch.randn(llm["hidden_size"], generator=g) * 4.0
    for k, v in tensors.items():  # in place, one at a time: the fp32 set alone is 2.5 GB
        if v.is_floating_point():
            tensors[k] = v.to(torch.bfloat16)
    save_file(tensors, str(model_dir / "model.safetensors"))
    (llm_dir / "config.json").write_text(json.dumps(llm, indent=1))
    with gzip.open(TOKENIZER / "tokenizer.json.gz", "rb") as src, open(llm_dir / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(TOKENIZER / "tokenizer_config.json", llm_dir)


def write_audio(out: Path) -> None:
    """Clip i starts at fixture utterance i mod 5 and takes whole utterances (each followed by a pause) while
    they fit in its target duration, then silence up to it."""
    rows = [json.loads(line) for line in UTTERANCES.read_text().splitlines() if line.strip()]
    waves = []
    for r in rows:
        wave, rate = sf.read(UTTERANCES.parent / r["audio_filepath"], dtype="float32")
        if rate != RATE or wave.ndim != 1:
            raise ValueError(f"{r['audio_filepath']}: expected 16 kHz mono, got {rate} Hz, shape {wave.shape}")
        waves.append((wave, r["text"]))
    pause = np.zeros(int(PAUSE_S * RATE), np.float32)
    (out / "audio").mkdir()
    lines = []
    for i, target in enumerate(DURATIONS):
        total = int(target * RATE)
        parts, texts, n, j = [], [], 0, i
        while True:
            wave, text = waves[j % len(waves)]
            if n + len(wave) > total:
                if texts:
                    break
                j += 1  # the first utterance must fit: try the next one
                continue
            parts += [wave, pause]
            texts.append(text)
            n += len(wave) + len(pause)
            j += 1
        clip = np.concatenate(parts)[:total]
        clip = np.pad(clip, (0, total - len(clip)))
        name = f"clip{i:02d}_{target:.1f}s.wav"
        sf.write(out / "audio" / name, clip, RATE, subtype="PCM_16")
        lines.append(json.dumps({"audio_filepath": f"audio/{name}", "duration": target, "text": " ".join(texts)}))
    (out / "manifest.jsonl").write_text("\n".join(lines) + "\n")


def write_hf_cache(llm_dir: Path, cache: Path) -> Path:
    """``llm_dir``'s files as the only snapshot of hub repo LLM_NAME in the hub cache ``cache``."""
    repo = cache / ("models--" + LLM_NAME.replace("/", "--"))
    snap = repo / "snapshots" / SNAPSHOT
    if repo.exists():
        shutil.rmtree(repo)
    snap.mkdir(parents=True)
    for f in llm_dir.iterdir():
        shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return snap


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="folder to create (must not exist)")
    p.add_argument("--hf-cache", type=Path, default=None, help="also register llm/ in this Hugging Face hub cache")
    p.add_argument("--layers", type=int, default=4, help="encoder and LLM layers (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists; choose a new folder", file=sys.stderr)
        return 2
    write_model(args.out, args.layers, args.seed)
    write_audio(args.out)
    if args.hf_cache:
        print(f"hub cache: {write_hf_cache(args.out / 'llm', args.hf_cache)} ({LLM_NAME})")
    print(f"wrote {args.out}/model, llm, audio and manifest.jsonl ({len(DURATIONS)} clips, {sum(DURATIONS):.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
