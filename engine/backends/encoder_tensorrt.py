"""The encoder stage on TensorRT: frontend.plan then encoder.plan, on torch CUDA tensors.

Runs on the caller's current CUDA stream (``execute_async_v3``), so it orders with the decoder's work without
synchronising; outputs are torch tensors allocated by the caching allocator on that stream. With several
optimization profiles there is one execution context per profile, and each batch takes the first profile
that holds it.

TensorRT Python API used (10.x and 11.x, docs.nvidia.com/deeplearning/tensorrt, "Python API": Runtime,
ICudaEngine, IExecutionContext): ``Runtime.deserialize_cuda_engine``, ``num_io_tensors``,
``get_tensor_name/mode/dtype``, ``create_execution_context``, ``set_optimization_profile_async``,
``set_input_shape``, ``get_tensor_shape``, ``set_tensor_address``, ``execute_async_v3``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..export.artifacts import PLAN_METADATA, ArtifactError, check_checkpoint, check_tensorrt, read_metadata
from ..export.tensorrt import import_tensorrt
from .encoder import BatchedEncoder


class _Plan:
    """One deserialized engine with an execution context per optimization profile."""

    def __init__(self, trt, runtime, path: Path, n_profiles: int, device: torch.device):
        if not path.is_file():
            raise ArtifactError(f"{path} is missing")
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"TensorRT cannot deserialize {path} (see the TensorRT log)")
        if self.engine.num_optimization_profiles != n_profiles:
            raise ArtifactError(f"{path} has {self.engine.num_optimization_profiles} profiles, its metadata "
                                f"{n_profiles}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                  trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
        self.dtypes = {n: dtypes[self.engine.get_tensor_dtype(n)] for n in self.outputs}
        self.device = device
        stream = torch.cuda.current_stream(device).cuda_stream
        self.contexts = []
        for i in range(n_profiles):
            context = self.engine.create_execution_context()
            context.set_optimization_profile_async(i, stream)
            self.contexts.append(context)

    def run(self, profile: int, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Enqueue one inference on the current stream; the outputs are ready in stream order. ``inputs``:
        contiguous CUDA tensors; the caching allocator keeps their memory for work on this stream."""
        context = self.contexts[profile]
        for name, t in inputs.items():
            if not context.set_input_shape(name, tuple(t.shape)):
                raise RuntimeError(f"{name} shape {tuple(t.shape)} is outside optimization profile {profile}")
            context.set_tensor_address(name, t.data_ptr())
        missing = context.infer_shapes()
        if missing:
            raise RuntimeError(f"TensorRT could not infer output shapes (missing inputs: {missing})")
        outputs = {}
        for name in self.outputs:
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, out.data_ptr())
            outputs[name] = out
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return outputs


class TensorRTEncoder(BatchedEncoder):
    name = "tensorrt"

    def __init__(self, artifacts: Path, weights: Path, device: torch.device, dtype: torch.dtype,
                 max_batch: int | None = None):
        """``max_batch``: default (and at most) the largest batch the profiles hold."""
        trt = import_tensorrt()
        artifacts, device = Path(artifacts), torch.device(device)
        if device.type != "cuda":
            raise ArtifactError(f"the TensorRT encoder runs on a CUDA device, not {device}")
        meta = read_metadata(artifacts / PLAN_METADATA)
        check_checkpoint(meta, weights, artifacts / PLAN_METADATA)
        major, minor = torch.cuda.get_device_capability(device)
        check_tensorrt(meta, artifacts / PLAN_METADATA, trt.__version__, torch.cuda.get_device_name(device),
                       f"{major}.{minor}")
        # Per profile: (batch min, batch max, width min, width max) in utterances and samples.
        self.profiles = [(p["frontend"]["audio"][0][0], p["frontend"]["audio"][2][0],
                          p["frontend"]["audio"][0][1], p["frontend"]["audio"][2][1]) for p in meta["profiles"]]
        largest = max(p[1] for p in self.profiles)
        model = meta["model"]
        super().__init__(min(max_batch or largest, largest), device, dtype, model["sample_rate"],
                         min_length=model["hop_length"], min_width=min(p[2] for p in self.profiles),
                         max_samples=max(p[3] for p in self.profiles))
        self.precision = meta["precision"]
        with torch.cuda.device(device):
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            plans = meta["plans"]
            self.frontend = _Plan(trt, self.runtime, artifacts / plans["frontend"], len(self.profiles), device)
            self.encoder = _Plan(trt, self.runtime, artifacts / plans["encoder"], len(self.profiles), device)

    def _pick(self, batch: int, width: int) -> tuple[int, int]:
        """First profile holding ``batch`` utterances ``width`` samples wide -> (profile, padded width)."""
        for i, (b_lo, b_hi, w_lo, w_hi) in enumerate(self.profiles):
            if b_lo <= batch <= b_hi and width <= w_hi:
                return i, max(width, w_lo)
        raise ArtifactError(f"no TensorRT optimization profile holds a batch of {batch} x {width} samples "
                            f"(profiles: {self.profiles}); rebuild with a wider profile")

    def _run(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        profile, width = self._pick(*audio.shape)
        with torch.cuda.device(self.device):
            x = torch.zeros(audio.shape[0], width, dtype=torch.float32, device=self.device)
            x[:, : audio.shape[1]] = audio.to(self.device, non_blocking=True)
            feats = self.frontend.run(profile, {"audio": x, "audio_lengths": lengths.to(self.device)})
            out = self.encoder.run(profile, {"audio_features": feats["audio_features"],
                                             "feature_lengths": feats["feature_lengths"]})
        return out["audio_embeddings"], out["embedding_lengths"]
