"""Engine options in one place: ``EngineOptions``, the command-line flags that set them, and the keywords of
``Engine.from_pretrained`` built from those flags. Shared by ``transcribe``, ``serve``, ``triton-repo`` and
``bench``; imports nothing from ``runtime``, so every command module can import it."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from engine.checkpoint import DEFAULT_MODEL
from engine.prompt import DEFAULT_ASR_PROMPT

DEFAULT_MAX_NEW_TOKENS = 256  # 128 (the model card's value) truncates fast 40 s speech

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineOptions:
    max_batch_size: int = 64  # running sequences decoded together
    max_queue: int = 1024  # requests waiting for admission before submit() raises QueueFull
    max_prefill_tokens: int = 8192  # prompt tokens (text + audio frames) admitted per step
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # default per request
    max_seq_len: int = 1024  # prompt + new tokens per request (40 s of audio = 500 frames)
    kv_block_size: int = 16  # tokens per KV block
    kv_cache_tokens: int | None = None  # None: free GPU memory x kv_memory_fraction; CPU: batch x seq len
    kv_memory_fraction: float = 0.8
    cuda_graphs: bool = True  # capture the decode step (CUDA only); False: eager
    prompt: str = DEFAULT_ASR_PROMPT
    # Admission in chunks: refill the running batch once this fraction of it is free (or nothing runs, or all
    # that waits fits). Each admission stalls the running streams for one encoder + prefill pass.
    refill_fraction: float = 0.25
    encoder_batch_size: int = 64  # clips per encoder batch (length-sorted)
    # Embeddings held for waiting requests, encoded ahead of their admission. At the release sizes one second
    # of audio is 12.5 frames x 2048 x 2 bytes (bf16) = 51 KB, so 512 MB hold about 2.7 hours of audio.
    encode_ahead_mb: float = 512.0


def add_model_arguments(p: argparse.ArgumentParser, repeatable_model: bool = False) -> None:
    """``repeatable_model``: ``--model`` and ``--llm`` may be given several times (lists; ``serve``)."""
    if repeatable_model:
        p.add_argument("--model", action="append", default=None,
                       help=f"hub id or folder of the release; repeat to serve several (default: {DEFAULT_MODEL})")
        p.add_argument("--llm", action="append", default=None,
                       help="base LLM hub id or folder (config + tokenizer), once for all models or once per "
                            "--model; default: pretrained_llm of config.json")
    else:
        p.add_argument("--model", default=DEFAULT_MODEL, help="hub id or folder of the release (default: %(default)s)")
        p.add_argument("--llm", default=None,
                       help="base LLM hub id or folder (config + tokenizer); default: pretrained_llm of config.json")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when present)")
    p.add_argument("--dtype", default="auto", choices=["auto", *sorted(DTYPES)],
                   help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--merge-lora", action="store_true", help="fold LoRA into the weights (faster, not bit-exact)")


def add_engine_arguments(p: argparse.ArgumentParser, repeatable_model: bool = False) -> None:
    """Model, backends and EngineOptions: shared by ``transcribe``, ``serve``, ``triton-repo`` and ``bench``."""
    d = EngineOptions()
    add_model_arguments(p, repeatable_model)
    p.add_argument("--encoder", choices=["auto", "torch", "onnx", "tensorrt"], default="auto",
                   help="encoder backend (default: the best that --artifacts allows here, else torch)")
    p.add_argument("--artifacts", default=None, metavar="DIR", help="encoder artifacts (build/export_encoder.py)")
    p.add_argument("--engine-dir", default=None, metavar="DIR",
                   help="TensorRT-LLM decoder build (build/build_decoder.py): decode with TensorRT-LLM")
    p.add_argument("--max-batch-size", "--batch-size", dest="max_batch_size", type=int, default=d.max_batch_size,
                   help="sequences decoded together in the in-flight batch (default: %(default)s)")
    p.add_argument("--max-queue", type=int, default=d.max_queue,
                   help="requests waiting for admission before new ones are refused (default: %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=d.max_seq_len,
                   help="prompt + audio frames (12.5 per second) + new tokens per request (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="per request (default: %(default)s)")
    p.add_argument("--kv-cache-tokens", type=int, default=None,
                   help="KV pool size in tokens (default: from free GPU memory; CPU: batch x max-seq-len)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="decode eagerly (no CUDA graphs)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    """``Engine.from_pretrained`` keywords from ``add_engine_arguments``' flags (JSON-serialisable)."""
    if args.max_batch_size < 1 or args.max_new_tokens < 1:
        raise ValueError("--max-batch-size and --max-new-tokens must be >= 1")
    return {"model": str(args.model), "llm": args.llm and str(args.llm), "device": args.device, "dtype": args.dtype,
            "merge_lora": args.merge_lora, "encoder": args.encoder, "artifacts": args.artifacts,
            "max_batch_size": args.max_batch_size, "max_queue": args.max_queue, "max_seq_len": args.max_seq_len,
            "max_new_tokens": args.max_new_tokens, "kv_cache_tokens": args.kv_cache_tokens,
            "cuda_graphs": not args.no_cuda_graphs,
            **({"decoder": "trtllm", "decoder_dir": str(args.engine_dir)} if args.engine_dir else {})}
