"""Export the audio side of Canary-Qwen-2.5B (mel frontend, FastConformer, projection) to ONNX.

    python build/export_encoder.py --model nvidia/canary-qwen-2.5b --output artifacts/encoder-bf16 \
        --precision bf16 --max-duration 40

Writes OUTPUT/frontend.onnx (always float32), OUTPUT/encoder.onnx (+ encoder.onnx.data above 1 GiB of
weights) and OUTPUT/onnx_metadata.json (see engine/export/onnx.py). Needs the model folder alone: only the
perception weights are read, and the projection's output size comes from them (no base-LLM config).

Precision: fp32 is the default because it is exact and runs everywhere (ONNX Runtime's CPU provider has no
bf16 kernels). For TensorRT plans on Ampere or Hopper export bf16: an fp32 plan runs the whole encoder in
fp32 (build/build_encoder_engine.py warns about it).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from engine.checkpoint import DEFAULT_MODEL, resolve_model_dir  # noqa: E402
from engine.export.onnx import PRECISIONS, export_onnx, load_perception  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="Canary-Qwen hub id or folder (default: %(default)s)")
    p.add_argument("--llm", default=None, help=argparse.SUPPRESS)  # accepted for old scripts; not needed
    p.add_argument("--output", required=True, type=Path, help="output folder")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="encoder precision; LayerNorm, attention scores and the frontend stay fp32 (default: fp32; "
                   "use bf16 for TensorRT plans)")
    p.add_argument("--max-duration", type=float, default=40.0,
                   help="longest utterance in seconds the graphs take (training maximum: 40)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from runtime.parakeet import is_parakeet

    if is_parakeet(args.model):  # Parakeet-TDT (issue 14): this encoder path, plus the TDT decoder graphs
        from engine.export.tdt_onnx import main as export_parakeet

        return export_parakeet(["--model", str(args.model), "--output", str(args.output), "--precision",
                                args.precision, "--max-duration", str(args.max_duration)])
    model_dir = resolve_model_dir(args.model)
    meta = export_onnx(load_perception(model_dir), model_dir / "model.safetensors", args.output, args.precision,
                       args.max_duration)
    s = meta["shapes"]
    print(f"{args.output}: {meta['precision']}, opset {meta['opset']['encoder']}, up to {s['max_duration']} s "
          f"({s['max_enc_frames']} encoder frames), checkpoint sha256 {meta['checkpoint']['sha256'][:12]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
