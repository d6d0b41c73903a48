"""Build TensorRT plans (frontend.plan, encoder.plan) from the ONNX that build/export_encoder.py wrote.

    python build/build_encoder_engine.py --artifacts artifacts/encoder-bf16 \
        --batch 1 16 64 --duration 0.5 10 40 --timing-cache artifacts/timing.cache

Strongly typed (the precision is the ONNX's), one optimization profile from the flags, the timing cache
reused across builds. Writes ARTIFACTS/tensorrt_metadata.json (TensorRT version, GPU, profile, ONNX hashes);
the runtime refuses the plans on another GPU or TensorRT. Needs TensorRT and a CUDA GPU.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from engine.export.artifacts import ArtifactError  # noqa: E402
from engine.export.tensorrt import Profile, build_plans  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", required=True, type=Path, help="folder with frontend.onnx + encoder.onnx")
    p.add_argument("--batch", type=int, nargs=3, default=[1, 8, 32], metavar=("MIN", "OPT", "MAX"),
                   help="utterances per batch (default: 1 8 32)")
    p.add_argument("--duration", type=float, nargs=3, default=None, metavar=("MIN", "OPT", "MAX"),
                   help="seconds of the longest utterance in a batch (default: 0.1, 10, the export's maximum)")
    p.add_argument("--timing-cache", type=Path, default=None, help="read and updated if given")
    p.add_argument("--optimization-level", type=int, default=3, choices=range(6),
                   help="builder optimization level 0-5 (default: 3; higher builds slower, may run faster)")
    p.add_argument("--workspace-gib", type=float, default=None, help="cap on the builder's scratch memory")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from engine.export.artifacts import ONNX_METADATA, read_metadata

        max_duration = read_metadata(args.artifacts / ONNX_METADATA)["shapes"]["max_duration"]
        duration = args.duration or [0.1, min(10.0, max_duration), max_duration]
        meta = build_plans(args.artifacts, [Profile(tuple(args.batch), tuple(duration))], args.timing_cache,
                           args.optimization_level, args.workspace_gib)
    except (ArtifactError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t = meta["tensorrt"]
    print(f"{args.artifacts}: {meta['precision']} plans for TensorRT {t['version']} on {t['gpu']} "
          f"(sm {t['compute_capability']}), batch {args.batch}, duration {duration} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
