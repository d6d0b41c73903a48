"""Encoder stage factory: audio -> projected audio embeddings, on torch, ONNX Runtime or TensorRT.

``make_encoder`` / ``open_encoder`` pick a backend by name, or the best one an artifact folder allows. The
backends share their batching (``BatchedEncoder``, engine/backends/encoder_base.py); only this module imports
them, so backends depend on the base and the factory on the backends.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import torch

from ..checkpoint import ModelFiles
from ..export.artifacts import ONNX_METADATA, PLAN_METADATA
from ..model import CanaryQwenModel, Perception
from .base import EncoderBackend
from .encoder_base import BatchedEncoder, length_batches  # noqa: F401  (re-exported: callers import them here)

log = logging.getLogger(__name__)

KINDS = ("auto", "torch", "onnx", "tensorrt")
# The engine encodes length-sorted batches of up to 64 clips ahead of admission.
DEFAULT_MAX_BATCH = 64


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def onnx_problem(artifacts: Path, device: torch.device) -> str | None:
    """Why the ONNX graphs in ``artifacts`` cannot run on ``device`` here, or None: onnxruntime's CPU provider
    has no bf16 kernels (NOT_IMPLEMENTED at the first run), and a CUDA device needs onnxruntime's CUDA
    provider."""
    import json

    try:
        precision = json.loads((artifacts / ONNX_METADATA).read_text(encoding="utf-8")).get("precision")
    except (OSError, ValueError):
        return None  # the backend reports a missing or broken metadata file itself
    if device.type != "cuda" and precision == "bf16":
        return (f"{artifacts} holds bf16 ONNX graphs, which onnxruntime cannot run on the CPU (export fp32 or fp16 "
                f"for the CPU: build/export_encoder.py --precision fp32)")
    if device.type == "cuda":
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            return "onnxruntime has no CUDA provider here (install onnxruntime-gpu)"
    return None


def best_available(artifacts: str | Path | None, device: torch.device) -> str:
    """TensorRT plans on a CUDA device with TensorRT installed, else ONNX graphs that onnxruntime can run on
    ``device``, else torch; a fallback says why."""
    if artifacts is None:
        return "torch"
    d = Path(artifacts)
    if (d / PLAN_METADATA).is_file() and device.type == "cuda" and _importable("tensorrt"):
        return "tensorrt"
    if (d / ONNX_METADATA).is_file() and _importable("onnxruntime"):
        problem = onnx_problem(d, device)
        if problem is None:
            return "onnx"
        log.warning("--encoder auto: %s: using the torch encoder", problem)
        return "torch"
    log.warning("%s has no encoder artifacts usable here (TensorRT plans need tensorrt and a CUDA device, ONNX "
                "files need onnxruntime): using the torch encoder", d)
    return "torch"


def make_encoder(kind: str | None, model: CanaryQwenModel, files: ModelFiles, artifacts: str | Path | None = None,
                 max_batch: int | None = None, **options) -> EncoderBackend:
    """The encoder for a loaded model: embeddings come out in its dtype, on its device. ``kind``: torch | onnx
    | tensorrt | auto (None = auto). ``artifacts``: the folder written by build/export_encoder.py (and
    build/build_encoder_engine.py). ``options`` go to the backend (onnx: ``provider``, ``threads``)."""
    return open_encoder(kind, model.perception, files.weights, artifacts, model.device, model.dtype, max_batch,
                        **options)


def open_encoder(kind: str | None, perception: Perception, weights: Path, artifacts: str | Path | None,
                 device: torch.device, dtype: torch.dtype, max_batch: int | None = None,
                 **options) -> EncoderBackend:
    """``make_encoder`` without a whole model: ``perception`` runs the torch backend, ``weights`` (the
    checkpoint's model.safetensors) is what artifacts must have been built from."""
    kind = kind or "auto"
    if kind not in KINDS:
        raise ValueError(f"unknown encoder backend {kind!r} (choose from {', '.join(KINDS)})")
    if kind == "auto":
        kind = best_available(artifacts, torch.device(device))
    if kind != "torch" and artifacts is None:
        raise ValueError(f"the {kind} encoder needs an artifacts folder (build/export_encoder.py writes one)")
    if kind == "torch":
        from .encoder_torch import TorchEncoder

        return TorchEncoder(perception, max_batch or DEFAULT_MAX_BATCH)
    if kind == "onnx":  # graphs onnxruntime cannot run here fail now, before a session is built or run
        on = torch.device(device) if options.get("provider") != "cpu" else torch.device("cpu")
        if (problem := onnx_problem(Path(artifacts), on)) is not None:
            raise ValueError(problem)
    configs = (perception.preprocessor.cfg, perception.encoder.cfg)  # the host-side length rule
    if kind == "onnx":
        from .encoder_onnx import OnnxEncoder

        return OnnxEncoder(Path(artifacts), weights, *configs, device, dtype, max_batch or DEFAULT_MAX_BATCH,
                           **options)
    from .encoder_tensorrt import TensorRTEncoder

    return TensorRTEncoder(Path(artifacts), weights, *configs, device, dtype, max_batch, **options)
