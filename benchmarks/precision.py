"""Deviation of each execution dtype from NeMo's fp32 goldens, stage by stage.

    python benchmarks/precision.py [--fixture tests/fixtures/tiny-canary-qwen] [--device cpu] [--out FILE]

Reports, per dtype, the max abs and relative (to max |ref|) error of mel features, encoder output,
projected audio embeddings and teacher-forced logits on the padded batch, and how many greedy ids agree
with NeMo's. Random-weight fixtures have small top-2 margins, so id disagreement in bf16 is expected there.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import soundfile as sf
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.checkpoint import build_model, resolve  # noqa: E402


def err(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a.double() - b.double()).abs().max().item()
    return {"max_abs": d, "rel": d / b.double().abs().max().item()}


def measure(fixture: Path, dtype: torch.dtype, device: str) -> dict:
    meta = json.loads((fixture / "golden.json").read_text())
    g = load_file(str(fixture / "golden.safetensors"))
    model, tok = build_model(resolve(fixture / "model", fixture / "llm"), dtype=dtype, device=device)
    stems = [a["stem"] for a in meta["audio_files"]]
    waves = [torch.from_numpy(sf.read(str(fixture / "audio" / f"{s}.wav"), dtype="float32")[0]) for s in stems]
    lens = torch.tensor([len(w) for w in waves])
    x = torch.zeros(len(waves), int(lens.max()))
    for i, w in enumerate(waves):
        x[i, : len(w)] = w
    with torch.no_grad():
        mel, _, enc, enc_lens, proj = model.perception(x.to(device), lens.to(device))
        valid = (torch.arange(enc.shape[1], device=device)[None] < enc_lens[:, None])[..., None]
        out = {"mel": err(mel.cpu(), g["batch.mel"]),
               "encoder": err((enc * valid).float().cpu(), g["batch.enc"] * valid.cpu()),
               "audio_embeddings": err((proj * valid).float().cpu(), g["batch.proj"] * valid.cpu())}
        tf, same, total = [], 0, 0
        for i, s in enumerate(stems):
            embeds = g[f"single.{s}.input_embeds"].to(device, dtype)
            ids = g[f"single.{s}.gen_ids"].to(device)
            full = torch.cat([embeds, model.embed_tokens(ids)[None]], 1)
            logits = model.forward_logits(full, torch.ones(full.shape[:2], dtype=torch.bool, device=device))
            tf.append(err(logits.float().cpu(), g[f"single.{s}.logits"]))
            e, m = model.splice([tok.prompt_ids()], tok.audio_id, [proj[i, : enc_lens[i]]])
            gen = model.generate(e, m, int(meta["generation"]["max_new_tokens"]), tok.eos_id, tok.pad_id)[0]
            ref = g[f"single.{s}.gen_ids"].tolist()
            n = next((k for k, (a, b) in enumerate(zip(gen.token_ids, ref)) if a != b), min(len(ref), len(gen.token_ids)))
            same, total = same + n, total + len(ref)
        out["teacher_forced_logits"] = {"max_abs": max(t["max_abs"] for t in tf), "rel": max(t["rel"] for t in tf)}
        out["greedy_ids_matching_prefix"] = f"{same}/{total}"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixture", type=Path, default=ROOT / "tests" / "fixtures" / "tiny-canary-qwen")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    report = {
        "fixture": args.fixture.name,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "results": {name: measure(args.fixture, dt, args.device)
                    for name, dt in (("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                     ("float16", torch.float16))},
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
