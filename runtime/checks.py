"""Checks made before any work, with messages that say what to do: missing extras, model arguments, a model
that failed to load. Imports nothing from ``runtime``, so every command module can use it."""

from __future__ import annotations

import argparse

# optional module -> the extra that brings it (pip install 'canary-trt[EXTRA]')
EXTRAS = {"onnxruntime": "onnx", "onnx": "onnx", "tensorrt": "tensorrt", "silero_vad": "longform",
          "kaldialign": "bench", "whisper_normalizer": "bench", "matplotlib": "bench", "fastapi": "serving",
          "uvicorn": "serving", "multipart": "serving", "prometheus_client": "serving", "openai": "client",
          "ray": "ray", "pyarrow": "ray", "nemo": None}


class UsageError(ValueError):
    """Bad command-line input, found before any model is loaded: exit code 2."""


def require(*modules: str, what: str) -> None:
    """Raise UsageError naming the extra to install when a module ``what`` needs is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        extras = sorted({EXTRAS.get(m) for m in missing if EXTRAS.get(m)})
        how = f"pip install 'canary-trt[{','.join(extras)}]'" if extras else f"pip install {' '.join(missing)}"
        raise UsageError(f"{what} needs {', '.join(missing)}: {how}")


def check_model_args(args: argparse.Namespace) -> None:
    """What can be said about --model/--llm/--encoder before loading anything."""
    import os

    for flag in ("model", "llm"):
        value = getattr(args, flag, None)
        if isinstance(value, str) and os.path.isfile(os.path.expanduser(value)) and not (
                flag == "model" and value.endswith(".nemo")):  # a Parakeet-TDT release is one .nemo file
            raise UsageError(f"--{flag} {value} is a file; pass the folder that holds it "
                             f"({'config.json + model.safetensors' if flag == 'model' else 'config.json + tokenizer.json'})"
                             f" or a hub id (owner/name)")
    encoder = getattr(args, "encoder", "auto")
    if encoder == "onnx":
        require("onnxruntime", what="--encoder onnx")
    elif encoder == "tensorrt":
        require("tensorrt", what="--encoder tensorrt")


def model_error(args: argparse.Namespace, e: BaseException) -> str:
    """The message for a model that failed to load, with what to do about it."""
    if isinstance(e, UsageError):
        return str(e)
    if isinstance(e, ImportError) and e.name:
        extra = EXTRAS.get(e.name.split(".")[0])
        return f"cannot load the model: {e}" + (f" (pip install 'canary-trt[{extra}]')" if extra else "")
    msg = f"cannot load the model: {e}"
    if getattr(args, "llm", None) is None and "base LLM" in str(e):
        msg += ("\n  the base LLM's config and tokenizer were not found: pass --llm DIR or set HF_HUB_OFFLINE=0 "
                "to download them (DIR: a folder with the base LLM's config.json and tokenizer.json)")
    return msg
