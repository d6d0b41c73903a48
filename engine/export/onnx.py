"""Export the audio side of Canary-Qwen to ONNX (what ``build/export_encoder.py`` calls).

- ``frontend.onnx``: audio float32 [B, N] + audio_lengths int64 [B] -> audio_features float32 [B, n_mels, T]
  + feature_lengths int64 [B]. Always float32; the STFT is a convolution (``ConvMelFrontend``), so the graph
  has only operators the TensorRT ONNX parser supports.
- ``encoder.onnx``: audio_features float32 + feature_lengths -> audio_embeddings [B, T_enc, llm_hidden]
  (FastConformer + projection) + embedding_lengths int64 [B]. Computed in fp32, fp16 or bf16; the low
  precision graphs keep LayerNorm and the attention scores + softmax in fp32. The embeddings come out in
  the graph's precision (bf16 for a bf16 graph, which is the LLM's dtype: half the bytes of fp32, and the
  same values, as the projection computes them in that precision anyway).

Batch and time are dynamic up to the maximum duration (the relative-position table is a constant sized for
it and sliced in the graph, as NeMo's export does). Every padding mask stays in the graph, so a padded
batch gives each utterance what it gets alone. The precision lives in the graph itself (strongly typed):
TensorRT 11 builds nothing else, and TensorRT 10 builds the same file with the STRONGLY_TYPED flag.
"""

from __future__ import annotations

import copy
import logging
import platform
from dataclasses import asdict, dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from ..checkpoint import ModelFiles, file_sha256, load_strict, module_name
from ..config import ConfigError, EncoderConfig, FrontendConfig, read_json
from ..encoder import ConvModule, RelPositionAttention, relative_positions, subsampled_lengths
from ..frontend import ConvMelFrontend
from ..model import Perception
from .artifacts import (ENCODER_ONNX, ENCODER_PLAN, FORMAT_VERSION, FRONTEND_ONNX, FRONTEND_PLAN, ONNX_METADATA,
                        PLAN_METADATA, checkpoint_sha256, write_metadata)

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# LayerNormalization needs opset >= 17; 18 is the dynamo exporter's native opset and inside the range every
# TensorRT 10.x/11.x parser documents (10.0/10.1: opsets 9-20; 10.15: 9-24). bf16 needs opset 22: before it,
# ONNX's Conv does not admit bfloat16 (onnxruntime and onnx's full check reject such a graph).
OPSETS = {"fp32": 18, "fp16": 18, "bf16": 22}
# One protobuf file cannot exceed 2 GiB; above this many bytes of weights they go to encoder.onnx.data.
EXTERNAL_DATA_BYTES = 1 << 30


@dataclass(frozen=True)
class Shapes:
    """Time limits of one export, all derived from its maximum duration."""

    max_duration: float  # seconds
    max_samples: int  # longest utterance
    max_mel_frames: int
    max_enc_frames: int
    # Narrowest batch the encoder is traced for (2 encoder frames: torch.export specialises a length-1
    # attention). Backends zero-pad narrower batches up to it; padding is masked, so results do not change.
    min_width: int  # samples
    min_mel_frames: int


def export_shapes(fe: FrontendConfig, enc: EncoderConfig, max_duration: float) -> Shapes:
    max_samples = int(round(max_duration * fe.sample_rate))
    max_mel = max_samples // fe.hop_length + 1  # frames of a batch max_samples wide (centre padding)
    min_mel = next(t for t in range(1, 64) if int(subsampled_lengths(enc, torch.tensor(t))) >= 2)
    if max_mel <= min_mel:
        raise ValueError(f"max duration {max_duration} s is too short to export")
    return Shapes(
        max_duration=float(max_duration),
        max_samples=max_samples,
        max_mel_frames=max_mel,
        max_enc_frames=int(subsampled_lengths(enc, torch.tensor(max_mel))),
        min_width=(min_mel - 1) * fe.hop_length,
        min_mel_frames=min_mel,
    )


@dataclass(frozen=True)
class _Width:
    hidden_size: int


@dataclass(frozen=True)
class PerceptionConfig:
    """What ``Perception`` reads of a ``ModelConfig`` (frontend, encoder, projection width), from the model
    folder alone: the base LLM's config is not needed to export or run the audio side."""

    frontend: FrontendConfig
    encoder: EncoderConfig
    llm: _Width  # only .hidden_size: the projection's output size, read from its weight

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> "PerceptionConfig":
        path = Path(model_dir) / "config.json"
        perception = read_json(path).get("perception")
        if not isinstance(perception, dict) or "preprocessor" not in perception or "encoder" not in perception:
            raise ConfigError(f"{path}: no perception.preprocessor / perception.encoder section")
        weights = Path(model_dir) / "model.safetensors"
        with safe_open(str(weights), framework="pt") as f:
            key = next((k for k in f.keys() if module_name(k) == "perception.proj.weight"), None)
            if key is None:
                raise ConfigError(f"{weights}: no perception.proj.weight")
            out_features = f.get_slice(key).get_shape()[0]  # [llm_hidden, d_model]
        return cls(FrontendConfig.from_nemo(perception["preprocessor"], str(path)),
                   EncoderConfig.from_nemo(perception["encoder"], str(path)), _Width(int(out_features)))


def _model_dir(files: ModelFiles | str | Path) -> Path:
    return files.model_dir if isinstance(files, ModelFiles) else Path(files)


def perception_skeleton(files: ModelFiles | str | Path) -> Perception:
    """The perception module on the meta device: its configs without reading a weight (what the ONNX and
    TensorRT encoder backends need of it)."""
    with torch.device("meta"):
        return Perception(PerceptionConfig.from_model_dir(_model_dir(files)))


def load_perception(files: ModelFiles | str | Path) -> Perception:
    """Frontend + encoder + projection alone, float32 on the CPU, from the model folder (or ``ModelFiles``):
    neither the LLM's weights nor its config are read."""
    model_dir = _model_dir(files)
    cfg = PerceptionConfig.from_model_dir(model_dir)
    weights = model_dir / "model.safetensors"
    prefix = "perception."
    with safe_open(str(weights), framework="pt") as f:
        tensors = {module_name(k)[len(prefix):]: f.get_tensor(k) for k in f.keys()
                   if module_name(k).startswith(prefix)}
    with torch.device("meta"):
        perception = Perception(cfg)
    load_strict(perception, tensors, str(weights), torch.float32)
    return perception.eval()


class Fp32LayerNorm(nn.Module):
    """LayerNorm computed in float32 inside a low-precision graph (its variance loses bits or overflows in fp16)."""

    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.normalized_shape, self.eps = ln.normalized_shape, ln.eps
        self.weight = nn.Parameter(ln.weight.detach().float().clone(), requires_grad=False)
        self.bias = nn.Parameter(ln.bias.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def fold_batch_norm(conv: nn.Conv1d, bn: nn.BatchNorm1d) -> nn.Conv1d:
    """conv -> BatchNorm (running statistics) as one conv, folded in float64 and returned in float32.

    The exporter's optimizer folds it anyway, but in the graph's dtype and, for bf16, into float32 weights
    that make the graph invalid; folding first keeps the graph typed and the folded weights exact.
    """
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # [C]
    folded = copy.deepcopy(conv).float()
    with torch.no_grad():
        folded.weight.copy_(conv.weight.double() * scale[:, None, None])
        folded.bias.copy_((conv.bias.double() - bn.running_mean.double()) * scale + bn.bias.double())
    return folded


class EncoderGraph(nn.Module):
    """What encoder.onnx computes: the model's encoder + projection in ``dtype``, float32 features in,
    embeddings out in ``dtype``."""

    def __init__(self, perception: Perception, max_enc_frames: int, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.encoder = copy.deepcopy(perception.encoder)
        for module in self.encoder.modules():
            if isinstance(module, ConvModule):
                module.depthwise_conv = fold_batch_norm(module.depthwise_conv, module.batch_norm)
                module.batch_norm = nn.Identity()
        self.encoder = self.encoder.to(dtype)
        self.proj = copy.deepcopy(perception.proj).to(dtype)
        if dtype != torch.float32:
            for name, module in perception.encoder.named_modules():
                if isinstance(module, nn.LayerNorm):
                    parent, _, child = name.rpartition(".")
                    setattr(self.encoder.get_submodule(parent), child, Fp32LayerNorm(module))
            for module in self.encoder.modules():
                if isinstance(module, RelPositionAttention):
                    module.scores_dtype = torch.float32
        d_model = perception.encoder.cfg.d_model
        self.register_buffer("pos_table", relative_positions(max_enc_frames, d_model, perception.proj.weight.device))

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, lengths = self.encoder(features.to(self.dtype), lengths, self.pos_table)  # [B, T_enc, d_model]
        return self.proj(x), lengths  # [B, T_enc, llm_hidden] in self.dtype


def _tool_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for dist in ("canary-trt", "torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-gpu"):
        try:
            versions[dist] = importlib_metadata.version(dist)
        except importlib_metadata.PackageNotFoundError:
            pass
    return versions


def _export(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
            dynamic_shapes: tuple, opset: int, external_data: bool) -> None:
    # The dynamo exporter (torch.export): shapes stay symbolic, so a length-dependent op cannot be frozen at
    # the example's size the way TorchScript tracing freezes it.
    torch.onnx.export(module, args, str(path), dynamo=True, opset_version=opset, input_names=input_names,
                      output_names=output_names, dynamic_shapes=dynamic_shapes, external_data=external_data,
                      verbose=False)


def _describe(path: Path) -> dict:
    """File name, sha256, external data files and the inputs/outputs ({name: {dtype, shape}}) of a saved graph."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def io(values) -> dict:
        out = {}
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out[v.name] = {"dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": dims}
        return out

    entry = {"file": path.name, "sha256": file_sha256(path), "inputs": io(model.graph.input),
             "outputs": io(model.graph.output)}
    locations = sorted({e.value for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                        for e in t.external_data if e.key == "location"})
    if locations:
        entry["external_data"] = [{"file": f, "sha256": file_sha256(path.parent / f)} for f in locations]
    return entry


def export_onnx(perception: Perception, weights: Path, output_dir: Path, precision: str = "fp32",
                max_duration: float = 40.0, external_data: bool | None = None) -> dict:
    """Write frontend.onnx, encoder.onnx and onnx_metadata.json into ``output_dir``; return the metadata.

    ``perception``: the float32 reference module (``load_perception``); ``weights``: the model.safetensors it
    came from (its sha256 goes into the metadata). ``external_data``: None = only when the weights are too
    big for a single file.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    fe_cfg, enc_cfg = perception.preprocessor.cfg, perception.encoder.cfg
    shapes = export_shapes(fe_cfg, enc_cfg, max_duration)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # Plans built from an earlier export must not survive next to the new one.
    for stale in (ENCODER_ONNX, ENCODER_ONNX + ".data", FRONTEND_ONNX, ONNX_METADATA, ENCODER_PLAN, FRONTEND_PLAN,
                  PLAN_METADATA):
        (output_dir / stale).unlink(missing_ok=True)

    batch = torch.export.Dim("batch", min=1)
    # Example: two utterances of different lengths, well inside the limits (any size but 0/1 would do).
    n_mel = min(shapes.max_mel_frames, max(shapes.min_mel_frames + 1, 200))
    n_samples = (n_mel - 1) * fe_cfg.hop_length

    frontend = ConvMelFrontend(perception.preprocessor).eval()
    audio = torch.randn(2, n_samples) * 0.1
    audio_lengths = torch.tensor([n_samples, n_samples * 3 // 4])
    samples = torch.export.Dim("samples", min=shapes.min_width, max=shapes.max_samples)
    log.info("exporting %s", output_dir / FRONTEND_ONNX)
    _export(frontend, (audio, audio_lengths), output_dir / FRONTEND_ONNX, ["audio", "audio_lengths"],
            ["audio_features", "feature_lengths"], ({0: batch, 1: samples}, {0: batch}), OPSETS["fp32"], False)

    dtype = PRECISIONS[precision]
    encoder = EncoderGraph(perception, shapes.max_enc_frames, dtype).eval()
    weight_bytes = sum(t.numel() * t.element_size() for t in encoder.state_dict().values())
    if external_data is None:
        external_data = weight_bytes > EXTERNAL_DATA_BYTES
    with torch.no_grad():
        features, lengths = frontend(audio, audio_lengths)
    frames = torch.export.Dim("mel_frames", min=shapes.min_mel_frames, max=shapes.max_mel_frames)
    log.info("exporting %s (%s, %.1f MB of weights)", output_dir / ENCODER_ONNX, precision, weight_bytes / 1e6)
    _export(encoder, (features, lengths), output_dir / ENCODER_ONNX, ["audio_features", "feature_lengths"],
            ["audio_embeddings", "embedding_lengths"], ({0: batch, 2: frames}, {0: batch}), OPSETS[precision],
            external_data)

    import onnx

    files = {}
    for key, name in (("frontend", FRONTEND_ONNX), ("encoder", ENCODER_ONNX)):
        # The path form also reads external data; full_check runs strict shape and type inference.
        onnx.checker.check_model(str(output_dir / name), full_check=True)
        files[key] = _describe(output_dir / name)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "onnx",
        "checkpoint": {"file": Path(weights).name, "sha256": checkpoint_sha256(Path(weights))},
        "precision": precision,
        "fp32_islands": [] if precision == "fp32" else ["frontend", "LayerNormalization", "attention scores + Softmax"],
        "opset": {"frontend": OPSETS["fp32"], "encoder": OPSETS[precision]},
        "shapes": asdict(shapes),
        "model": {"sample_rate": fe_cfg.sample_rate, "hop_length": fe_cfg.hop_length, "n_mels": fe_cfg.n_mels,
                  "d_model": enc_cfg.d_model, "llm_hidden": perception.proj.out_features,
                  "subsampling_factor": enc_cfg.subsampling_factor},
        "files": files,
        "tools": _tool_versions(),
    }
    write_metadata(output_dir / ONNX_METADATA, meta)
    return meta
