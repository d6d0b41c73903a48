"""Find the model files (hub id or folder) and load the release checkpoint strictly.

Layouts accepted:
- release: ``<model>/config.json`` + ``<model>/model.safetensors``; the LLM config and tokenizer come from the
  base LLM (``--llm``, default ``pretrained_llm`` of config.json), folder or hub id; only its config and
  tokenizer files are fetched, never its weights (they are inside model.safetensors);
- NeMo 3.0: the same plus tokenizer files and ``llm_backbone/config.json`` inside the model folder.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from .config import ModelConfig
from .model import CanaryQwenModel
from .prompt import Tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "nvidia/canary-qwen-2.5b"
MODEL_FILES = ["config.json", "model.safetensors"]
LLM_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "vocab.json", "merges.txt"]
NEMO_EXTRA_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                    "llm_backbone/config.json"]

# Checkpoint key -> module name. Everything else is named as in the checkpoint.
RENAMES = [
    ("perception.preprocessor.featurizer.", "perception.preprocessor."),
    ("llm.base_model.model.model.", "llm."),
    ("llm.base_model.model.lm_head.", "lm_head."),
    (".base_layer.", "."),
    (".lora_A.default.", ".lora_A."),
    (".lora_B.default.", ".lora_B."),
]


class CheckpointError(ValueError):
    """The checkpoint does not fit the config: missing, unexpected or mis-shaped tensors, or unreadable."""


@dataclass(frozen=True)
class ModelFiles:
    model_dir: Path  # config.json + model.safetensors
    llm_config: Path  # the base LLM's config.json
    tokenizer_dir: Path  # folder with tokenizer.json (+ tokenizer_config.json)

    @property
    def weights(self) -> Path:
        return self.model_dir / "model.safetensors"


def _is_local(ref: str) -> bool:
    return os.path.isdir(os.path.expanduser(ref))


def _download(repo_id: str, patterns: list[str], what: str) -> Path:
    """Hub snapshot restricted to ``patterns`` (works offline from the cache with HF_HUB_OFFLINE=1)."""
    if "/" not in repo_id or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{what} {repo_id!r}: no such folder, and not a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # network, auth, offline without cache: say which repo and why
        raise FileNotFoundError(f"{what} {repo_id!r}: could not fetch from the hub ({type(e).__name__}: {e})") from e


def resolve_model_dir(model: str | os.PathLike = DEFAULT_MODEL) -> Path:
    """The release folder alone (config.json + model.safetensors), downloaded if it is a hub id."""
    model = str(model)
    model_dir = Path(os.path.expanduser(model)) if _is_local(model) else _download(
        model, MODEL_FILES + NEMO_EXTRA_FILES, "model")
    for f in MODEL_FILES:
        if not (model_dir / f).is_file():
            raise FileNotFoundError(f"model {model}: {model_dir / f} is missing")
    return model_dir


def resolve(model: str | os.PathLike = DEFAULT_MODEL, llm: str | os.PathLike | None = None) -> ModelFiles:
    """Locate config, weights, LLM config and tokenizer; download what is missing from the hub."""
    model_dir = resolve_model_dir(model)
    if llm is None and (model_dir / "llm_backbone" / "config.json").is_file() and (
            model_dir / "tokenizer.json").is_file():
        return ModelFiles(model_dir, model_dir / "llm_backbone" / "config.json", model_dir)
    if llm is None:
        from .config import read_json

        llm = read_json(model_dir / "config.json").get("pretrained_llm")
        if not llm:
            raise FileNotFoundError(f"{model_dir / 'config.json'}: no pretrained_llm; pass the base LLM explicitly")
    llm = str(llm)
    llm_dir = Path(os.path.expanduser(llm)) if _is_local(llm) else _download(llm, LLM_FILES, "base LLM")
    for f in ("config.json", "tokenizer.json"):
        if not (llm_dir / f).is_file():
            raise FileNotFoundError(f"base LLM {llm}: {llm_dir / f} is missing")
    return ModelFiles(model_dir, llm_dir / "config.json", llm_dir)


def module_name(key: str) -> str:
    for old, new in RENAMES:
        key = key.replace(old, new)
    return key


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, renamed to module names."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {module_name(k): f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
        raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from e


def load_strict(model: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str, dtype: torch.dtype) -> None:
    """Fill every parameter and buffer from ``tensors`` or raise one error listing every problem.

    Float tensors are cast to ``dtype`` except the frontend's (window, filterbank), which stay float32.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = sorted(
        f"{k}: checkpoint {list(tensors[k].shape)} vs model {list(expected[k].shape)}"
        for k in set(expected) & set(tensors)
        if tensors[k].shape != expected[k].shape
    )
    if missing or unexpected or mismatched:
        parts = [f"{source}: checkpoint does not match the model config"]
        for name, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
            if items:
                parts.append(f"  {name} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointError("\n".join(parts))
    state = {}
    for k, t in tensors.items():
        if t.is_floating_point():
            t = t.to(torch.float32 if k.startswith("perception.preprocessor.") else dtype)
        elif t.dtype != expected[k].dtype:
            raise CheckpointError(f"{source}: {k} has dtype {t.dtype}, expected {expected[k].dtype}")
        state[k] = t
    model.load_state_dict(state, strict=True, assign=True)


def build_model(files: ModelFiles, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                merge_lora: bool = False) -> tuple[CanaryQwenModel, Tokenizer]:
    """Config -> module on the meta device -> strict load -> device. Returns the eval-mode model and tokenizer."""
    cfg = ModelConfig.from_files(files.model_dir / "config.json", files.llm_config)
    tokenizer = Tokenizer.from_dir(files.tokenizer_dir, cfg.audio_locator_tag)
    if tokenizer.audio_id >= cfg.llm.vocab_size:
        raise CheckpointError(
            f"{files.tokenizer_dir}: audio tag id {tokenizer.audio_id} does not fit the LLM vocabulary "
            f"({cfg.llm.vocab_size}): tokenizer and model do not belong together")
    with torch.device("meta"):
        model = CanaryQwenModel(cfg)
    load_strict(model, read_tensors(files.weights), str(files.weights), dtype)
    if merge_lora:
        model.llm.merge_lora()
    return model.to(device).eval(), tokenizer


def file_sha256(path: Path, chunk: int = 1 << 24) -> str:
    """Content hash of a checkpoint file, recorded in build-artifact metadata."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
