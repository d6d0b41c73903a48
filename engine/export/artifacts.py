"""Build artifacts of the encoder stage: file names, metadata JSON, and the checks a loader makes.

An artifact folder holds ``frontend.onnx`` + ``encoder.onnx`` (+ ``encoder.onnx.data`` for large models) and
``onnx_metadata.json``; ``build/build_encoder_engine.py`` adds ``frontend.plan`` + ``encoder.plan`` and
``tensorrt_metadata.json``. A backend refuses a folder whose metadata names another checkpoint (sha256 of
``model.safetensors``) or, for plans, another TensorRT version or GPU: such a mismatch gives wrong
numbers or a crash, never a useful result.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from ..checkpoint import file_sha256

FRONTEND_ONNX = "frontend.onnx"
ENCODER_ONNX = "encoder.onnx"
ONNX_METADATA = "onnx_metadata.json"
FRONTEND_PLAN = "frontend.plan"
ENCODER_PLAN = "encoder.plan"
PLAN_METADATA = "tensorrt_metadata.json"
FORMAT_VERSION = 1


class ArtifactError(RuntimeError):
    """An artifact is missing, unreadable, or was built for another checkpoint, TensorRT or GPU."""


@lru_cache(maxsize=8)
def _cached_sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))


def checkpoint_sha256(weights: Path) -> str:
    """sha256 of ``model.safetensors``, computed once per process and file version (5 GB take seconds)."""
    st = os.stat(weights)
    return _cached_sha256(str(Path(weights).resolve()), st.st_size, st.st_mtime_ns)


def write_metadata(path: Path, meta: dict) -> None:
    path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n", encoding="utf-8")


def read_metadata(path: Path) -> dict:
    if not path.is_file():
        raise ArtifactError(f"{path}: metadata file not found (export the encoder with build/export_encoder.py, "
                            "or build the plans with build/build_encoder_engine.py)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: unknown metadata format (expected format_version {FORMAT_VERSION})")
    return meta


def check_checkpoint(meta: dict, weights: Path, source: Path) -> None:
    """Refuse artifacts exported from another checkpoint than the one the runtime loaded."""
    want = meta.get("checkpoint", {}).get("sha256")
    have = checkpoint_sha256(weights)
    if want != have:
        raise ArtifactError(
            f"{source} was built from a checkpoint with sha256 {want}, but {weights} has sha256 {have}: "
            "re-export the encoder for this checkpoint (build/export_encoder.py)")


def check_tensorrt(meta: dict, source: Path, trt_version: str, gpu_name: str, capability: str) -> None:
    """Refuse plans built by another TensorRT version or for another GPU (a plan is not portable)."""
    built = meta.get("tensorrt", {})
    problems = []
    if built.get("version") != trt_version:
        problems.append(f"TensorRT {built.get('version')} built it, this is TensorRT {trt_version}")
    if built.get("gpu") != gpu_name or built.get("compute_capability") != capability:
        problems.append(f"it was built on {built.get('gpu')} (sm {built.get('compute_capability')}), "
                        f"this is {gpu_name} (sm {capability})")
    if problems:
        raise ArtifactError(f"{source}: " + "; ".join(problems) + ": rebuild the plans on this machine "
                            "(build/build_encoder_engine.py)")


def check_model_config(meta: dict, frontend, encoder, source: Path) -> None:
    """The runtime computes embedding lengths from its own configs (``FrontendConfig``, ``EncoderConfig``):
    refuse artifacts whose recorded frontend/subsampling settings differ from them."""
    want = {"sample_rate": frontend.sample_rate, "hop_length": frontend.hop_length, "n_mels": frontend.n_mels,
            "subsampling_factor": encoder.subsampling_factor}
    have = {k: meta.get("model", {}).get(k) for k in want}
    if have != want:
        raise ArtifactError(f"{source}: exported with {have}, the model has {want}: re-export the encoder")
