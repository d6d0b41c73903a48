"""Encoder stage: audio -> projected audio embeddings, on torch, ONNX Runtime or TensorRT.

All three backends batch the same way (``BatchedEncoder``): utterances sorted by length, longest first, cut
into batches of at most ``max_batch``, so similar lengths share a batch; each batch is zero-padded and
carries its lengths, and the model's masks make padding invisible (a padded batch gives each utterance what
it gets alone). ``make_encoder`` picks a backend by name, or the best one an artifact folder allows.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..checkpoint import ModelFiles
from ..export.artifacts import ONNX_METADATA, PLAN_METADATA
from ..model import CanaryQwenModel, Perception
from .base import EncoderBackend

log = logging.getLogger(__name__)

KINDS = ("auto", "torch", "onnx", "tensorrt")


def length_batches(lengths: Sequence[int], max_batch: int) -> list[list[int]]:
    """Indices sorted by length (longest first, stable), cut into batches of at most ``max_batch``."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + max_batch] for i in range(0, len(order), max_batch)]


class BatchedEncoder(ABC):
    """Shared batching; a backend implements ``_run`` on one zero-padded batch.

    ``min_length``: clips shorter than this (one hop) count as zero-padded to it, as in the API: below one
    hop the frontend has no frame at all. ``min_width``: narrower batches are zero-padded to this many
    samples (masked, so exact), for graphs traced or built for a minimum length. ``max_samples``: the
    longest utterance the artifacts take (None: no limit).
    """

    name = "?"

    def __init__(self, max_batch: int, device: torch.device, dtype: torch.dtype, sample_rate: int, min_length: int,
                 min_width: int = 0, max_samples: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch, self.device, self.dtype, self.sample_rate = max_batch, torch.device(device), dtype, sample_rate
        self.min_length, self.min_width, self.max_samples = min_length, min_width, max_samples

    def encode(self, audio: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """16 kHz mono float32 waveforms -> one [T_enc_i, llm_hidden] tensor each (``dtype``, on ``device``)."""
        lengths = [max(len(a), self.min_length) for a in audio]
        if self.max_samples is not None and lengths and max(lengths) > self.max_samples:
            i = int(np.argmax(lengths))
            sr = self.sample_rate
            raise ValueError(f"utterance {i} is {lengths[i] / sr:.2f} s long; the {self.name} encoder artifacts take "
                             f"at most {self.max_samples / sr:.2f} s (re-export with a larger --max-duration)")
        out: list[torch.Tensor | None] = [None] * len(audio)
        for idx in length_batches(lengths, self.max_batch):
            width = max(max(lengths[i] for i in idx), self.min_width)
            batch = torch.zeros(len(idx), width, dtype=torch.float32)
            for row, i in enumerate(idx):
                batch[row, : len(audio[i])] = torch.from_numpy(np.asarray(audio[i], dtype=np.float32))
            emb, emb_lens = self._run(batch, torch.tensor([lengths[i] for i in idx], dtype=torch.int64))
            emb_lens = emb_lens.tolist()
            for row, i in enumerate(idx):
                out[i] = emb[row, : emb_lens[row]].to(self.device, self.dtype)
        return out  # type: ignore[return-value]

    @abstractmethod
    def _run(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, N] float32 (CPU) + lengths [B] int64 -> embeddings [B, T_enc, H] + lengths [B]."""


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def best_available(artifacts: str | Path | None, device: torch.device) -> str:
    """TensorRT plans on a CUDA device with TensorRT installed, else ONNX with onnxruntime, else torch."""
    if artifacts is None:
        return "torch"
    d = Path(artifacts)
    if (d / PLAN_METADATA).is_file() and device.type == "cuda" and _importable("tensorrt"):
        return "tensorrt"
    if (d / ONNX_METADATA).is_file() and _importable("onnxruntime"):
        return "onnx"
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

        return TorchEncoder(perception, max_batch or 16)
    if kind == "onnx":
        from .encoder_onnx import OnnxEncoder

        return OnnxEncoder(Path(artifacts), weights, device, dtype, max_batch or 16, **options)
    from .encoder_tensorrt import TensorRTEncoder

    return TensorRTEncoder(Path(artifacts), weights, device, dtype, max_batch, **options)
