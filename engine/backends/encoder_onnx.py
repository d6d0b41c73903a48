"""The encoder stage on ONNX Runtime: frontend.onnx then encoder.onnx, on the CPU or CUDA provider.

Tensors cross the host between the two sessions and at the end (numpy in and out): simple, and cheap next to
the encoder itself on a CPU. On a GPU the TensorRT backend is the fast path.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..export.artifacts import (ENCODER_ONNX, FRONTEND_ONNX, ONNX_METADATA, ArtifactError, check_checkpoint,
                                check_model_config, read_metadata)
from ..config import EncoderConfig, FrontendConfig
from .encoder_base import BatchedEncoder


def session_options(threads: int = 0):
    """Explicit, so results and thread use do not depend on onnxruntime's changing defaults."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads  # 0: one per physical core
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3  # errors only: the dynamo export's shape-inference notes are noise
    return opts


def providers_for(provider: str, device: torch.device) -> list:
    import onnxruntime as ort

    if provider == "cpu":
        return ["CPUExecutionProvider"]
    if provider != "cuda":
        raise ValueError(f"provider must be cpu or cuda, got {provider!r}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ArtifactError("onnxruntime has no CUDA provider here (install onnxruntime-gpu, and have a CUDA GPU)")
    return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]


class OnnxEncoder(BatchedEncoder):
    name = "onnx"

    def __init__(self, artifacts: Path, weights: Path, frontend: FrontendConfig, encoder: EncoderConfig,
                 device: torch.device, dtype: torch.dtype, max_batch: int = 64, provider: str | None = None,
                 threads: int = 0):
        """``provider``: cpu | cuda (default: cuda when ``device`` is a CUDA device)."""
        import onnxruntime as ort

        artifacts, device = Path(artifacts), torch.device(device)
        meta = read_metadata(artifacts / ONNX_METADATA)
        check_checkpoint(meta, weights, artifacts / ONNX_METADATA)
        for name in (FRONTEND_ONNX, ENCODER_ONNX):
            if not (artifacts / name).is_file():
                raise ArtifactError(f"{artifacts / name} is missing")
        check_model_config(meta, frontend, encoder, artifacts / ONNX_METADATA)
        shapes = meta["shapes"]
        super().__init__(max_batch, device, dtype, frontend, encoder, min_width=shapes["min_width"],
                         max_samples=shapes["max_samples"])
        self.precision = meta["precision"]
        provider = provider or ("cuda" if device.type == "cuda" else "cpu")
        opts, providers = session_options(threads), providers_for(provider, device)
        self.frontend = ort.InferenceSession(str(artifacts / FRONTEND_ONNX), sess_options=opts, providers=providers)
        self.encoder = ort.InferenceSession(str(artifacts / ENCODER_ONNX), sess_options=opts, providers=providers)

    def _run(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, feature_lengths = self.frontend.run(
            ["audio_features", "feature_lengths"], {"audio": audio.numpy(), "audio_lengths": lengths.numpy()})
        emb, emb_lens = self.encoder.run(["audio_embeddings", "embedding_lengths"],
                                         {"audio_features": features, "feature_lengths": feature_lengths})
        return torch.from_numpy(emb), torch.from_numpy(emb_lens)
