"""Parakeet-TDT (NeMo ``EncDecRNNTBPEModel`` with a TDT joint): config, network and strict loader.

The release is one ``.nemo`` file, an uncompressed tar of ``model_config.yaml``, ``model_weights.ckpt`` and
the SentencePiece tokenizer; an extracted folder of the same files and a hub id (whose ``*.nemo`` is
fetched) are accepted too. The network reuses the Canary-Qwen frontend and FastConformer encoder with every
setting read from ``model_config.yaml``; the prediction network (embedding + LSTM) and the joint network are
defined here. Greedy decoding, text and timestamps live in ``engine/tdt.py``.

Checkpoint names -> module names (``RENAMES``): ``preprocessor.featurizer.`` -> ``preprocessor.``,
``decoder.prediction.embed.`` -> ``prediction.embed.``, ``decoder.prediction.dec_rnn.lstm.`` ->
``prediction.lstm.``, ``joint.joint_net.<i>.`` (the last Linear) -> ``joint.out.``. Everything else keeps its
name, so the load is a strict state-dict load.
"""

from __future__ import annotations

import logging
import os
import tarfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import CheckpointError, load_strict
from .config import ConfigError, EncoderConfig, FrontendConfig, _expect, _require
from .encoder import ConformerEncoder
from .frontend import MelFrontend

log = logging.getLogger(__name__)

CANARY_QWEN, PARAKEET_TDT = "canary-qwen", "parakeet-tdt"
NEMO_CONFIG, NEMO_WEIGHTS = "model_config.yaml", "model_weights.ckpt"
RNNT_BPE_TARGET = "EncDecRNNTBPEModel"


class NemoError(ValueError):
    """A ``.nemo`` archive or folder is unreadable or incomplete; the message names the file and the member."""


# ---- configuration ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TdtConfig:
    """Everything needed to build Parakeet-TDT and decode it greedily."""

    frontend: FrontendConfig
    encoder: EncoderConfig
    labels: tuple[str, ...]  # SentencePiece pieces, id order; the blank is len(labels)
    pred_hidden: int
    pred_rnn_layers: int
    joint_hidden: int
    durations: tuple[int, ...]  # duration index k advances durations[k] frames
    max_symbols: int  # emissions on one frame before a forced advance
    joint_out_index: int  # position of the final Linear in NeMo's joint_net Sequential (2 with dropout, else 1)
    window_stride: float  # seconds per mel frame (timestamps)

    @property
    def vocab_size(self) -> int:
        return len(self.labels)

    @property
    def blank_id(self) -> int:
        return len(self.labels)

    @property
    def joint_outputs(self) -> int:
        return len(self.labels) + 1 + len(self.durations)

    @property
    def frame_seconds(self) -> float:
        """One encoder frame in seconds (0.08 for Parakeet)."""
        return self.window_stride * self.encoder.subsampling_factor

    @classmethod
    def from_nemo(cls, cfg: dict, source: str) -> "TdtConfig":
        check_tdt_family(cfg, source)
        dec, joint = _require(cfg, "decoder", source), _require(cfg, "joint", source)
        decoding = cfg.get("decoding") or {}
        prednet, jointnet = _require(dec, "prednet", source), _require(joint, "jointnet", source)
        labels = tuple(str(x) for x in _require(cfg, "labels", source))
        sizes = (int(dec.get("vocab_size", len(labels))), int(joint.get("num_classes", len(labels))))
        if sizes != (len(labels), len(labels)):
            raise ConfigError(f"{source}: decoder.vocab_size={dec.get('vocab_size')} / joint.num_classes="
                              f"{joint.get('num_classes')} differ from the {len(labels)} labels")
        _expect(bool(dec.get("blank_as_pad", True)), (True,), "decoder.blank_as_pad", source)
        _expect(dec.get("normalization_mode"), (None,), "decoder.normalization_mode", source)
        _expect(int(prednet.get("rnn_hidden_size", -1) or -1), (-1,), "decoder.prednet.rnn_hidden_size", source)
        _expect(jointnet.get("activation", "relu"), ("relu",), "joint.jointnet.activation", source)
        _expect(joint.get("log_softmax"), (None, True, False), "joint.log_softmax", source)
        durations = tuple(int(d) for d in decoding.get("durations") or (cfg.get("model_defaults") or {}).get(
            "tdt_durations") or ())
        if not durations or any(d < 0 for d in durations):
            raise ConfigError(f"{source}: decoding.durations={list(durations)} must be a non-empty list of "
                              f"non-negative frame counts")
        extra = int(joint.get("num_extra_outputs", 0))
        if extra != len(durations):
            raise ConfigError(f"{source}: joint.num_extra_outputs={extra} differs from the {len(durations)} "
                              f"TDT durations")
        greedy = decoding.get("greedy") or {}
        max_symbols = greedy.get("max_symbols", greedy.get("max_symbols_per_step", 10))
        pre = _require(cfg, "preprocessor", source)
        enc = EncoderConfig.from_nemo(_require(cfg, "encoder", source), source)
        frontend = FrontendConfig.from_nemo(pre, source)
        if enc.feat_in != frontend.n_mels:
            raise ConfigError(f"{source}: encoder.feat_in={enc.feat_in} differs from preprocessor.features="
                              f"{frontend.n_mels}")
        enc_hidden = int(jointnet.get("encoder_hidden", enc.d_model))
        pred_hidden = int(_require(prednet, "pred_hidden", source))
        if enc_hidden != enc.d_model or int(jointnet.get("pred_hidden", pred_hidden)) != pred_hidden:
            raise ConfigError(f"{source}: joint.jointnet encoder_hidden/pred_hidden ({enc_hidden}/"
                              f"{jointnet.get('pred_hidden')}) differ from encoder.d_model={enc.d_model} / "
                              f"decoder.prednet.pred_hidden={pred_hidden}")
        return cls(
            frontend=frontend,
            encoder=enc,
            labels=labels,
            pred_hidden=pred_hidden,
            pred_rnn_layers=int(prednet.get("pred_rnn_layers", 1)),
            joint_hidden=int(_require(jointnet, "joint_hidden", source)),
            durations=durations,
            max_symbols=int(max_symbols) if max_symbols is not None else 10**9,
            joint_out_index=2 if float(jointnet.get("dropout", 0.0) or 0.0) > 0 else 1,
            window_stride=float(_require(pre, "window_stride", source)),
        )


def check_tdt_family(cfg: dict, source: str) -> None:
    """Raise ConfigError naming the model if ``model_config.yaml`` is not a Parakeet-TDT (RNNT-BPE + TDT)."""
    target = str(cfg.get("target", ""))
    model_type = (cfg.get("decoding") or {}).get("model_type", "rnnt")
    loss = (cfg.get("loss") or {}).get("loss_name")
    if not target.endswith(RNNT_BPE_TARGET):
        raise ConfigError(f"{source}: target {target or '(none)'!r} is not a Parakeet-TDT model "
                          f"(expected nemo...{RNNT_BPE_TARGET} with decoding.model_type tdt)")
    if model_type != "tdt" and loss != "tdt":
        raise ConfigError(f"{source}: decoding.model_type={model_type!r}: an RNN-T model, not TDT "
                          f"(only Parakeet-TDT is supported)")


# ---- network ---------------------------------------------------------------------------------------------


class PredictionNetwork(nn.Module):
    """NeMo ``RNNTDecoder.prediction``: Embedding(V+1, H, padding_idx=blank) then an LSTM of L layers.

    The blank row of the embedding is zero (padding_idx), so feeding the blank id (the start symbol) gives the
    zero input NeMo uses for the first step."""

    def __init__(self, cfg: TdtConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size + 1, cfg.pred_hidden, padding_idx=cfg.blank_id)
        self.lstm = nn.LSTM(cfg.pred_hidden, cfg.pred_hidden, num_layers=cfg.pred_rnn_layers)

    def forward(self, labels: torch.Tensor, h: torch.Tensor, c: torch.Tensor):
        """labels [B] -> output [B, H], new (h, c) each [L, B, H].

        One step, layer by layer with ``torch.lstm_cell`` on the LSTM's own weights: the same gates as
        ``nn.LSTM`` (equal to ~1e-7), without its per-call weight repacking on CPU (oneDNN), which costs far
        more than a one-step LSTM itself."""
        x = self.embed(labels)  # [B, H]
        hs, cs = [], []
        for k in range(self.lstm.num_layers):
            x, ck = torch.lstm_cell(x, (h[k], c[k]), getattr(self.lstm, f"weight_ih_l{k}"),
                                    getattr(self.lstm, f"weight_hh_l{k}"), getattr(self.lstm, f"bias_ih_l{k}"),
                                    getattr(self.lstm, f"bias_hh_l{k}"))
            hs.append(x)
            cs.append(ck)
        return x, torch.stack(hs), torch.stack(cs)


class JointNetwork(nn.Module):
    """NeMo ``RNNTJoint``: enc and pred projections, then ReLU and Linear to [V vocabulary | blank | D durations]."""

    def __init__(self, cfg: TdtConfig):
        super().__init__()
        self.enc = nn.Linear(cfg.encoder.d_model, cfg.joint_hidden)
        self.pred = nn.Linear(cfg.pred_hidden, cfg.joint_hidden)
        self.out = nn.Linear(cfg.joint_hidden, cfg.joint_outputs)

    def forward(self, f: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Projected encoder frame f [..., J] + projected prediction g [..., J] -> raw logits [..., V+1+D]."""
        return self.out(torch.relu(f + g))


class ParakeetTDT(nn.Module):
    """Frontend + FastConformer + prediction and joint networks. The decoder half (prediction, joint) always
    runs in float32: it is small, and its argmax decisions are what must match NeMo."""

    def __init__(self, cfg: TdtConfig):
        super().__init__()
        self.cfg = cfg
        self.preprocessor = MelFrontend(cfg.frontend)
        self.encoder = ConformerEncoder(cfg.encoder)
        self.prediction = PredictionNetwork(cfg)
        self.joint = JointNetwork(cfg)

    @property
    def device(self) -> torch.device:
        return self.joint.out.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The encoder's dtype (the decoder half is float32)."""
        return self.encoder.pre_encode.out.weight.dtype

    def encode(self, audio: torch.Tensor, lengths: torch.Tensor):
        """audio [B, N] + lengths -> (mel [B, n_mels, N//hop+1], mel_lens, enc [B, T, D] float32, enc_lens)."""
        mel, mel_lens = self.preprocessor(audio, lengths)
        enc, enc_lens = self.encoder(mel.to(self.dtype), mel_lens)
        return mel, mel_lens, enc.float(), enc_lens


# ---- the release format ----------------------------------------------------------------------------------


class NemoArchive:
    """Members of a ``.nemo`` file (tar, plain or compressed) or of an extracted folder, by base name."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tar: tarfile.TarFile | None = None
        if self.path.is_dir():
            self.names = {p.name: p for p in self.path.iterdir() if p.is_file()}
            return
        try:
            self._tar = tarfile.open(self.path, "r:*")
            members = self._tar.getmembers()
        except (tarfile.TarError, EOFError, OSError) as e:
            raise NemoError(f"{self.path}: not a readable .nemo archive ({type(e).__name__}: {e})") from None
        self.names = {os.path.basename(m.name): m for m in members if m.isfile()}

    def has(self, name: str) -> bool:
        return name in self.names

    def open(self, name: str, what: str):
        """A binary file object for member ``name``; NemoError naming ``what`` if it is absent."""
        if name not in self.names:
            raise NemoError(f"{self.path}: has no {what} ({name}); members: {sorted(self.names)}")
        if self._tar is None:
            return open(self.names[name], "rb")
        f = self._tar.extractfile(self.names[name])
        if f is None:
            raise NemoError(f"{self.path}: member {name} is not a file")
        return f

    def read(self, name: str, what: str) -> bytes:
        try:
            with self.open(name, what) as f:
                return f.read()
        except (tarfile.TarError, EOFError, OSError) as e:  # truncated archive
            raise NemoError(f"{self.path}: cannot read {name} ({type(e).__name__}: {e})") from None

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()


def read_config(archive: NemoArchive) -> dict:
    import yaml

    text = archive.read(NEMO_CONFIG, "model config")
    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{archive.path}/{NEMO_CONFIG}: not valid YAML ({e})") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{archive.path}/{NEMO_CONFIG}: expected a mapping")
    return cfg


def _hub_nemo(repo_id: str) -> Path:
    """The ``.nemo`` of a hub repo (or its folder if it ships config.json: Canary-Qwen); offline from the cache
    with HF_HUB_OFFLINE=1."""
    from .checkpoint import _download

    root = _download(repo_id, ["config.json", NEMO_CONFIG], "model")  # small files first
    if (root / "config.json").is_file() and not (root / NEMO_CONFIG).is_file():
        return root  # a Canary-Qwen release: never fetch a .nemo it may also ship
    root = _download(repo_id, ["*.nemo", NEMO_CONFIG], "model")
    nemos = sorted(root.glob("*.nemo"))
    if len(nemos) > 1:
        raise NemoError(f"model {repo_id}: several .nemo files ({[p.name for p in nemos]}): pass one as a path")
    return nemos[0] if nemos else root


def locate(model: str | os.PathLike) -> Path:
    """A local ``.nemo`` file or folder as is; a hub id -> its downloaded ``.nemo`` (or folder)."""
    ref = os.path.expanduser(str(model))
    if os.path.exists(ref):
        return Path(ref)
    return _hub_nemo(str(model))


def detect_family(model: str | os.PathLike) -> str:
    """``"canary-qwen"`` or ``"parakeet-tdt"`` for a ``--model`` value (hub id, ``.nemo`` file or folder),
    from its config; ConfigError / NemoError / FileNotFoundError naming the model otherwise."""
    path = locate(model)
    if path.is_dir() and not (path / NEMO_CONFIG).is_file():
        if (path / "config.json").is_file():
            return CANARY_QWEN
        raise FileNotFoundError(f"model {model}: {path} has neither config.json (Canary-Qwen) nor "
                                f"{NEMO_CONFIG} (Parakeet-TDT)")
    archive = NemoArchive(path)
    try:
        check_tdt_family(read_config(archive), f"{path}/{NEMO_CONFIG}" if path.is_dir() else f"{path}:{NEMO_CONFIG}")
    finally:
        archive.close()
    return PARAKEET_TDT


class SentencePieceText:
    """NeMo's SentencePiece detokenisation for RNN-T/TDT models: ids >= blank dropped, ``decode_ids``, then one
    whitespace removed before each supported punctuation mark (the punctuation characters of the vocabulary)."""

    def __init__(self, model_proto: bytes, source: str):
        import re

        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError / OSError on a bad proto
            raise NemoError(f"{source}: not a SentencePiece model ({type(e).__name__}: {e})") from None
        self.source = source
        self.vocab_size = self.sp.get_piece_size()
        self.pieces = [self.sp.id_to_piece(i) for i in range(self.vocab_size)]
        self.punctuation = {ch for p in self.pieces for ch in p if unicodedata.category(ch).startswith("P")}
        alternatives = "|".join(re.escape(p) for p in sorted(self.punctuation))
        self._space_before_punct = re.compile(r"(\s)(" + alternatives + ")") if self.punctuation else None

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text, exactly as NeMo's ``decode_hypothesis``."""
        text = self.sp.decode_ids([int(i) for i in ids if 0 <= i < self.vocab_size])
        return self._space_before_punct.sub(r"\2", text) if self._space_before_punct else text

    def decode_raw(self, ids: list[int]) -> str:
        """``decode_ids`` alone (NeMo's ``decode_tokens_to_str``), for word and token timestamps."""
        return self.sp.decode_ids([int(i) for i in ids])


def read_tokenizer(archive: NemoArchive, cfg: dict) -> SentencePieceText:
    tok = cfg.get("tokenizer") or {}
    model_path = str(tok.get("model_path") or "tokenizer.model")
    name = os.path.basename(model_path.removeprefix("nemo:"))
    if not archive.has(name):  # older archives name it tokenizer.model whatever the config says
        candidates = [n for n in archive.names if n.endswith("tokenizer.model")]
        if len(candidates) == 1:
            name = candidates[0]
    return SentencePieceText(archive.read(name, f"SentencePiece tokenizer (tokenizer.model_path={model_path})"),
                             f"{archive.path}:{name}")


RENAMES = [
    ("preprocessor.featurizer.", "preprocessor."),
    ("decoder.prediction.embed.", "prediction.embed."),
    ("decoder.prediction.dec_rnn.lstm.", "prediction.lstm."),
]


def module_names(tensors: dict[str, torch.Tensor], cfg: TdtConfig) -> dict[str, torch.Tensor]:
    """Checkpoint names -> ``ParakeetTDT`` names (module docstring). Unknown names pass through unchanged, so
    the strict load reports them as unexpected."""
    renames = RENAMES + [(f"joint.joint_net.{cfg.joint_out_index}.", "joint.out.")]
    out = {}
    for k, t in tensors.items():
        for old, new in renames:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = t
    return out


def checkpoint_names(cfg: TdtConfig, names: list[str]) -> list[str]:
    """The inverse of ``module_names``: what a NeMo checkpoint calls each module tensor."""
    inverse = [(new, old) for old, new in RENAMES] + [("joint.out.", f"joint.joint_net.{cfg.joint_out_index}.")]
    result = []
    for k in names:
        for new, old in inverse:
            if k.startswith(new):
                k = old + k[len(new):]
                break
        result.append(k)
    return result


def read_weights(archive: NemoArchive) -> dict[str, torch.Tensor]:
    f = archive.open(NEMO_WEIGHTS, "weights")
    try:  # a tar member is a seekable file object: torch.load reads it in place, without a second copy
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError / UnpicklingError / EOFError on a damaged file
        raise CheckpointError(f"{archive.path}:{NEMO_WEIGHTS}: cannot read the weights "
                              f"({type(e).__name__}: {e})") from None
    finally:
        f.close()
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{archive.path}:{NEMO_WEIGHTS}: expected a dict of tensors")
    return state


def build_from_state(cfg: TdtConfig, tensors: dict[str, torch.Tensor], source: str,
                     dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> ParakeetTDT:
    """Config -> module on the meta device -> strict load (every tensor used, every shape checked) -> device.

    The encoder is cast to ``dtype``; the frontend and the prediction and joint networks stay float32."""
    with torch.device("meta"):
        model = ParakeetTDT(cfg)
    load_strict(model, module_names(tensors, cfg), source, torch.float32)
    model.encoder.to(dtype)
    return model.to(device).eval()


def load_parakeet(model: str | os.PathLike, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> tuple[ParakeetTDT, SentencePieceText]:
    """Load a Parakeet-TDT release (hub id, ``.nemo`` file or extracted folder) strictly."""
    path = locate(model)
    if path.is_dir() and not (path / NEMO_CONFIG).is_file() and (path / "config.json").is_file():
        raise ConfigError(f"{path}: a Canary-Qwen release (config.json, no {NEMO_CONFIG}), not a Parakeet-TDT "
                          f"model: load it with engine.checkpoint / runtime.Engine")
    archive = NemoArchive(path)
    try:
        raw = read_config(archive)
        source = f"{path}:{NEMO_CONFIG}"
        cfg = TdtConfig.from_nemo(raw, source)
        tokenizer = read_tokenizer(archive, raw)
        if tokenizer.vocab_size != cfg.vocab_size:
            raise CheckpointError(f"{tokenizer.source}: {tokenizer.vocab_size} pieces, but {source} has "
                                  f"{cfg.vocab_size} labels: tokenizer and model do not belong together")
        if tuple(tokenizer.pieces) != cfg.labels:
            bad = next(i for i, (a, b) in enumerate(zip(tokenizer.pieces, cfg.labels)) if a != b)
            raise CheckpointError(f"{tokenizer.source}: piece {bad} is {tokenizer.pieces[bad]!r}, label {bad} in "
                                  f"{source} is {cfg.labels[bad]!r}: tokenizer and model do not belong together")
        net = build_from_state(cfg, read_weights(archive), f"{path}:{NEMO_WEIGHTS}", dtype, device)
    finally:
        archive.close()
    log.info("loaded Parakeet-TDT from %s: %d encoder layers, d_model %d, %d labels", path, cfg.encoder.n_layers,
             cfg.encoder.d_model, cfg.vocab_size)
    return net, tokenizer


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def config_from_yaml(path: str | os.PathLike) -> TdtConfig:
    """``TdtConfig`` of a bare ``model_config.yaml`` (tests, tools)."""
    import yaml

    with open(path, encoding="utf-8") as f:
        raw: Any = yaml.safe_load(f)
    return TdtConfig.from_nemo(raw, str(path))
