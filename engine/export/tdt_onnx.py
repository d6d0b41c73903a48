"""Export Parakeet-TDT to ONNX: its encoder through the Canary-Qwen path, its decoder as two small graphs.

- ``frontend.onnx`` + ``encoder.onnx`` (+ ``onnx_metadata.json``): written by ``engine.export.onnx.export_onnx``
  for a perception-shaped view of the model whose projection is the joint's encoder projection
  (``joint.enc``). So ``audio_embeddings`` [B, T_enc, joint_hidden] are the projected encoder frames the TDT
  decoder consumes (NeMo too projects the encoder output once per utterance), and the backends, the
  TensorRT build and ``check-encoder`` apply unchanged.
- ``prediction.onnx``: labels int64 [B] + h, c float32 [L, B, pred_hidden] -> pred_proj float32
  [B, joint_hidden] (the LSTM output through ``joint.pred``) + h_out, c_out. The blank id is the start symbol.
- ``joint.onnx``: enc_proj [B, joint_hidden] + pred_proj [B, joint_hidden] -> logits [B, V+1+D] (raw:
  [vocabulary | blank | durations]).
- ``tdt_metadata.json``: blank id, durations, max_symbols, sizes, file hashes, the checkpoint's sha256.

The decoder graphs are float32 (they are small, and their argmax decisions must match NeMo's).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from ..encoder import ConvModule
from ..parakeet import ParakeetTDT
from .artifacts import checkpoint_sha256, write_metadata

log = logging.getLogger(__name__)

PREDICTION_ONNX, JOINT_ONNX, TDT_METADATA = "prediction.onnx", "joint.onnx", "tdt_metadata.json"
DECODER_OPSET = 18


class ParakeetPerception(nn.Module):
    """The model seen as ``engine.model.Perception`` (preprocessor, encoder, proj), proj = ``joint.enc``."""

    def __init__(self, model: ParakeetTDT):
        super().__init__()
        self.preprocessor = model.preprocessor
        self.encoder = copy.deepcopy(model.encoder)
        self.proj = model.joint.enc
        # The export folds BatchNorm into the depthwise conv, which needs a bias: a zero one changes nothing.
        for module in self.encoder.modules():
            if isinstance(module, ConvModule) and module.depthwise_conv.bias is None:
                conv = module.depthwise_conv
                conv.bias = nn.Parameter(torch.zeros(conv.out_channels, dtype=conv.weight.dtype,
                                                     device=conv.weight.device), requires_grad=False)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor):
        mel, mel_lens = self.preprocessor(audio, lengths)
        enc, enc_lens = self.encoder(mel.to(self.proj.weight.dtype), mel_lens)
        return mel, mel_lens, enc, enc_lens, self.proj(enc)


class PredictionGraph(nn.Module):
    def __init__(self, model: ParakeetTDT):
        super().__init__()
        self.prediction, self.pred = model.prediction, model.joint.pred

    def forward(self, labels: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        g, h, c = self.prediction(labels, h, c)
        return self.pred(g), h, c


class JointGraph(nn.Module):
    def __init__(self, model: ParakeetTDT):
        super().__init__()
        self.joint = model.joint

    def forward(self, enc_proj: torch.Tensor, pred_proj: torch.Tensor) -> torch.Tensor:
        return self.joint(enc_proj, pred_proj)


def _export(module: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
            dynamic_axes: dict) -> None:
    # The TorchScript exporter: the decoder graphs have no length-dependent shapes that tracing could freeze.
    # The one-step LSTM (torch.lstm_cell) becomes Gemm, Sigmoid, Tanh and Mul nodes: plain operators for
    # every runtime and for the TensorRT parser.
    torch.onnx.export(module, args, str(path), dynamo=False, opset_version=DECODER_OPSET, input_names=inputs,
                      output_names=outputs, dynamic_axes=dynamic_axes)


def export_decoder(model: ParakeetTDT, output_dir: str | Path, checkpoint: Path | None = None) -> dict:
    """Write prediction.onnx, joint.onnx and tdt_metadata.json; return the metadata."""
    import onnx

    from .onnx import _describe

    cfg = model.cfg
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    b, layers, hp, j = 2, cfg.pred_rnn_layers, cfg.pred_hidden, cfg.joint_hidden
    labels = torch.tensor([cfg.blank_id, 0])
    h = torch.zeros(layers, b, hp)
    with torch.no_grad():
        _export(PredictionGraph(model).eval(), (labels, h, h.clone()), out / PREDICTION_ONNX,
                ["labels", "h", "c"], ["pred_proj", "h_out", "c_out"],
                {"labels": {0: "batch"}, "h": {1: "batch"}, "c": {1: "batch"}, "pred_proj": {0: "batch"},
                 "h_out": {1: "batch"}, "c_out": {1: "batch"}})
        _export(JointGraph(model).eval(), (torch.randn(b, j), torch.randn(b, j)), out / JOINT_ONNX,
                ["enc_proj", "pred_proj"], ["logits"],
                {"enc_proj": {0: "batch"}, "pred_proj": {0: "batch"}, "logits": {0: "batch"}})
    for name in (PREDICTION_ONNX, JOINT_ONNX):
        onnx.checker.check_model(str(out / name), full_check=True)
    meta = {
        "kind": "parakeet-tdt-decoder",
        "blank_id": cfg.blank_id,
        "vocab_size": cfg.vocab_size,
        "durations": list(cfg.durations),
        "max_symbols": cfg.max_symbols,
        "pred_hidden": hp,
        "pred_rnn_layers": layers,
        "joint_hidden": j,
        "joint_outputs": cfg.joint_outputs,
        "opset": DECODER_OPSET,
        "files": {"prediction": _describe(out / PREDICTION_ONNX), "joint": _describe(out / JOINT_ONNX)},
    }
    if checkpoint is not None:
        meta["checkpoint"] = {"file": Path(checkpoint).name, "sha256": checkpoint_sha256(Path(checkpoint))}
    write_metadata(out / TDT_METADATA, meta)
    return meta


def checkpoint_file(path: str | Path) -> Path:
    """The file whose sha256 ties artifacts to a Parakeet release: the ``.nemo``, or an extracted folder's
    model_weights.ckpt."""
    path = Path(path)
    return path / "model_weights.ckpt" if path.is_dir() else path


def load_tdt_perception(model: str | Path) -> tuple[ParakeetPerception, Path]:
    """(float32 perception view of a Parakeet release, its ``checkpoint_file``): what check-encoder compares
    exported artifacts against."""
    from ..parakeet import load_parakeet, locate

    net, _ = load_parakeet(model)
    return ParakeetPerception(net).eval(), checkpoint_file(locate(model))


def export_parakeet(model: ParakeetTDT, checkpoint: Path, output_dir: str | Path, precision: str = "fp32",
                    max_duration: float = 40.0) -> dict:
    """Encoder (frontend.onnx, encoder.onnx: the shared path) and decoder graphs into ``output_dir``.

    ``model``: the float32 reference (``load_parakeet``); ``checkpoint``: the ``.nemo`` file or extracted
    folder it came from (``checkpoint_file`` is hashed into both metadata files)."""
    from .onnx import export_onnx

    weights = checkpoint_file(checkpoint)
    model = model.float().eval()
    meta = export_onnx(ParakeetPerception(model), weights, Path(output_dir), precision, max_duration)
    meta["decoder"] = export_decoder(model, output_dir, weights)
    return meta


def main(argv: list[str] | None = None) -> int:
    """``python -m engine.export.tdt_onnx --model <hub id | .nemo | folder> --output DIR``."""
    import argparse

    from ..parakeet import load_parakeet, locate
    from .onnx import PRECISIONS

    p = argparse.ArgumentParser(description="Export Parakeet-TDT: frontend.onnx, encoder.onnx, prediction.onnx, "
                                            "joint.onnx and their metadata")
    p.add_argument("--model", required=True, help="hub id, .nemo file or extracted folder")
    p.add_argument("--output", required=True, type=Path)
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS), help="encoder precision (decoder: fp32)")
    p.add_argument("--max-duration", type=float, default=40.0, help="longest utterance in seconds the encoder takes")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    net, _ = load_parakeet(args.model)
    meta = export_parakeet(net, locate(args.model), args.output, args.precision, args.max_duration)
    print(f"{args.output}: encoder {meta['precision']} up to {meta['shapes']['max_duration']} s, decoder graphs fp32")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
