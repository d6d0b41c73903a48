"""The encoder stage on TensorRT: frontend.plan then encoder.plan, on torch CUDA tensors.

Streams: the plans run on a stream of their own, ordered after the caller's current stream on entry and
before it on exit (``wait_stream`` both ways), so the encoder neither races the decoder's work nor needs a
host sync; the outputs are marked as used on the caller's stream (``record_stream``) so the caching allocator
does not hand their memory out early. The profile switch (``set_optimization_profile_async``) is enqueued on
that same stream, ahead of the inference that uses it, which is the ordering TensorRT requires.

Memory: one execution context per plan, switching profiles, so each plan holds one activation buffer (sized
for its largest profile) rather than one per profile.

Profiles: each batch takes the profile that holds it with the least padding (``pick_profile``); a batch with
fewer rows than a profile's minimum is padded with minimum-length rows, dropped afterwards.

TensorRT Python API used (10.x and 11.x, docs.nvidia.com/deeplearning/tensorrt, "Python API": Runtime,
ICudaEngine, IExecutionContext): ``Runtime.deserialize_cuda_engine``, ``num_io_tensors``,
``num_optimization_profiles``, ``get_tensor_name/mode/dtype``, ``create_execution_context``,
``set_optimization_profile_async``, ``set_input_shape``, ``infer_shapes``, ``get_tensor_shape``,
``set_tensor_address``, ``execute_async_v3``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..config import EncoderConfig, FrontendConfig
from ..export.artifacts import (PLAN_METADATA, ArtifactError, check_checkpoint, check_model_config, check_tensorrt,
                                read_metadata)
from ..export.tensorrt import import_tensorrt
from .encoder_base import BatchedEncoder

# Per profile: (batch min, batch max, width min, width max), in utterances and samples.
ProfileLimits = tuple[int, int, int, int]


def profile_limits(meta: dict) -> list[ProfileLimits]:
    """The frontend input ``audio`` [batch, samples] limits of each profile in tensorrt_metadata.json."""
    return [(p["frontend"]["audio"][0][0], p["frontend"]["audio"][2][0],
             p["frontend"]["audio"][0][1], p["frontend"]["audio"][2][1]) for p in meta["profiles"]]


def pick_profile(profiles: Sequence[ProfileLimits], rows: int, width: int) -> tuple[int, int, int]:
    """The profile for a batch of ``rows`` utterances ``width`` samples wide -> (profile, padded rows, padded
    width). Among the profiles that hold it (rows up to their maximum, width up to theirs; fewer rows or a
    narrower batch are padded up to their minimum), the one with the least padded area, then the narrowest
    (its kernels were timed for lengths closer to the batch's), then the one with fewer rows, then the first."""
    best = None
    for i, (b_lo, b_hi, w_lo, w_hi) in enumerate(profiles):
        if rows <= b_hi and width <= w_hi:
            r, w = max(rows, b_lo), max(width, w_lo)
            key = (r * w, w_hi, b_hi, i)
            if best is None or key < best[0]:
                best = (key, (i, r, w))
    if best is None:
        raise ArtifactError(f"no TensorRT optimization profile holds a batch of {rows} x {width} samples "
                            f"(profiles: {list(profiles)}); rebuild with a wider profile")
    return best[1]


def rows_for(profiles: Sequence[ProfileLimits], width: int) -> int:
    """Most rows any profile takes at ``width`` samples (0: none takes that width)."""
    return max((b_hi for _, b_hi, _, w_hi in profiles if width <= w_hi), default=0)


class _Plan:
    """One deserialized engine and one execution context that switches between its profiles."""

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
        # Device memory sized for the largest profile, allocated once (the default strategy, STATIC).
        self.context = self.engine.create_execution_context()
        self.profile: int | None = None  # none selected yet: the first run selects one on its stream

    def run(self, profile: int, inputs: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        """Enqueue one inference on ``stream`` (the current stream, where ``inputs`` were made); the outputs
        are ready in that stream's order."""
        context, handle = self.context, stream.cuda_stream
        if profile != self.profile:
            # Enqueued on the inference stream itself: ordered after earlier inferences and before this one.
            if not context.set_optimization_profile_async(profile, handle):
                raise RuntimeError(f"TensorRT refused optimization profile {profile}")
            self.profile = profile
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
        if not context.execute_async_v3(handle):
            raise RuntimeError("TensorRT execute_async_v3 failed (see the TensorRT log)")
        return outputs


class TensorRTEncoder(BatchedEncoder):
    name = "tensorrt"

    def __init__(self, artifacts: Path, weights: Path, frontend: FrontendConfig, encoder: EncoderConfig,
                 device: torch.device, dtype: torch.dtype, max_batch: int | None = None):
        """``max_batch``: default (and at most) the largest batch the profiles hold."""
        trt = import_tensorrt()
        artifacts, device = Path(artifacts), torch.device(device)
        if device.type != "cuda":
            raise ArtifactError(f"the TensorRT encoder runs on a CUDA device, not {device}")
        meta = read_metadata(artifacts / PLAN_METADATA)
        check_checkpoint(meta, weights, artifacts / PLAN_METADATA)
        check_model_config(meta, frontend, encoder, artifacts / PLAN_METADATA)
        major, minor = torch.cuda.get_device_capability(device)
        check_tensorrt(meta, artifacts / PLAN_METADATA, trt.__version__, torch.cuda.get_device_name(device),
                       f"{major}.{minor}")
        self.profiles = profile_limits(meta)
        largest = max(p[1] for p in self.profiles)
        super().__init__(min(max_batch or largest, largest), device, dtype, frontend, encoder,
                         min_width=min(p[2] for p in self.profiles), max_samples=max(p[3] for p in self.profiles))
        self.precision = meta["precision"]
        with torch.cuda.device(device):
            self.stream = torch.cuda.Stream(device)
            self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            plans = meta["plans"]
            self.frontend = _Plan(trt, self.runtime, artifacts / plans["frontend"], len(self.profiles), device)
            self.encoder = _Plan(trt, self.runtime, artifacts / plans["encoder"], len(self.profiles), device)

    def _rows_for(self, width: int) -> int:
        return min(self.max_batch, rows_for(self.profiles, width))

    def _padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        _, rows, width = pick_profile(self.profiles, rows, width)
        return rows, width

    def _run(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        profile, _, _ = pick_profile(self.profiles, *audio.shape)  # the shape is already padded to it
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # after the caller's pending work (its memory may be reused here)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            x = audio.to(self.device, non_blocking=True)  # one copy from the pinned staging batch
            x_lens = lengths.to(self.device, non_blocking=True)
            feats = self.frontend.run(profile, {"audio": x, "audio_lengths": x_lens}, self.stream)
            out = self.encoder.run(profile, {"audio_features": feats["audio_features"],
                                             "feature_lengths": feats["feature_lengths"]}, self.stream)
        caller.wait_stream(self.stream)  # the caller sees finished embeddings, without a host sync
        emb, emb_lens = out["audio_embeddings"], out["embedding_lengths"]
        emb.record_stream(caller)
        emb_lens.record_stream(caller)
        return emb, emb_lens
