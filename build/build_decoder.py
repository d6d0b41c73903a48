"""Build the TensorRT-LLM decoder of Canary-Qwen-2.5B.

    python build/build_decoder.py --model nvidia/canary-qwen-2.5b --output artifacts/decoder [--skip-engine]

Writes OUTPUT/hf (plain Qwen3 checkpoint, LoRA merged), OUTPUT/trtllm_ckpt, OUTPUT/decoder_meta.json and,
when tensorrt_llm (1.0 <= version < 1.3) is installed and --skip-engine is not given, OUTPUT/engine (see
engine/export/trtllm.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from engine.checkpoint import DEFAULT_MODEL, resolve  # noqa: E402
from engine.export.trtllm import DTYPES, DecoderBuildError, export_decoder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="Canary-Qwen hub id or folder (default: %(default)s)")
    p.add_argument("--llm", default=None, help="base LLM hub id or folder (default: pretrained_llm of the config)")
    p.add_argument("--output", required=True, type=Path, help="output folder")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--max-audio-seconds", type=float, default=40.0, help="longest audio (training maximum: 40)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--skip-engine", action="store_true", help="write hf/ and trtllm_ckpt/ only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        meta = export_decoder(resolve(args.model, args.llm), args.output, args.dtype, args.max_batch_size,
                              args.max_audio_seconds, args.max_new_tokens, args.skip_engine)
    except DecoderBuildError as e:  # e.g. a tensorrt_llm outside 1.0-1.2: the message says what to use
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = meta["sizes"]
    print(f"{args.output}: {meta['dtype']}, engine={'built' if meta['engine'] else 'not built'}, "
          f"max_input_len={s['max_input_len']}, max_seq_len={s['max_seq_len']}, "
          f"prompt table={s['max_prompt_embedding_table_size']} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
