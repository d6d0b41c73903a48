"""``hf/``: the LLM as a plain Hugging Face Qwen3 checkpoint with the LoRA merged.

This is what transformers (``Qwen3ForCausalLM``), vLLM and TensorRT-LLM's PyTorch backend load, and the
source of the TensorRT-LLM engine checkpoint (``engine/export/trtllm.py``). Audio still enters as input
embeddings spliced at the ``<|audioplaceholder|>`` position, which the exported tokenizer knows as a
special token with the same id as the engine's prompt (the first free id: 151669 for Qwen3).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.checkpoint import CheckpointError, ModelFiles, load_strict, module_name
from engine.config import ModelConfig, read_json
from engine.llm import Qwen3
from engine.prompt import Tokenizer

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("vocab.json", "merges.txt")  # copied as they are; tokenizer.json/_config.json are edited


def merged_llm_weights(files: ModelFiles, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The LLM's weights under Hugging Face names (``model.*``, ``lm_head.weight`` only when untied).

    The LoRA is merged in float32 (``LoraLinear.merge``) and only then cast to ``dtype``, so a bf16 export
    rounds once. Only the LLM's tensors are read: the encoder (0.8 B parameters) never enters memory.
    """
    cfg = ModelConfig.from_files(files.model_dir / "config.json", files.llm_config)
    body, head = {}, {}
    try:
        with safe_open(str(files.weights), framework="pt") as f:
            for key in f.keys():
                name = module_name(key)
                if name.startswith("llm."):
                    body[name.removeprefix("llm.")] = f.get_tensor(key)
                elif name in ("embed_tokens.weight", "lm_head.weight"):
                    head[name] = f.get_tensor(key)
    except Exception as e:  # safetensors raises its own error types for truncated / corrupt headers
        raise CheckpointError(f"{files.weights}: cannot read safetensors file ({type(e).__name__}: {e})") from e
    expected_head = {"embed_tokens.weight"} | (set() if cfg.llm.tie_word_embeddings else {"lm_head.weight"})
    if set(head) != expected_head:
        raise CheckpointError(f"{files.weights}: expected {sorted(expected_head)} (tie_word_embeddings="
                              f"{cfg.llm.tie_word_embeddings}), found {sorted(head)}")
    with torch.device("meta"):
        llm = Qwen3(cfg.llm, cfg.lora)
    load_strict(llm, body, str(files.weights), torch.float32)
    del body
    llm.merge_lora()
    llm.to(dtype)  # tensor by tensor, so float32 and `dtype` copies of the whole LLM never coexist
    weights = {f"model.{k}": v for k, v in llm.state_dict().items()}
    # bf16 -> float32 is exact, so casting the stored embedding directly equals "float32, then cast".
    weights["model.embed_tokens.weight"] = head["embed_tokens.weight"].to(dtype)
    if not cfg.llm.tie_word_embeddings:
        weights["lm_head.weight"] = head["lm_head.weight"].to(dtype)
    return cfg, weights


def hf_config(llm_config: dict, cfg: ModelConfig, dtype: torch.dtype) -> dict:
    """The base LLM's config.json as a Qwen3ForCausalLM of the exported dtype."""
    name = str(dtype).removeprefix("torch.")
    out = dict(llm_config)
    out.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3",
               tie_word_embeddings=cfg.llm.tie_word_embeddings,
               # transformers >= 4.56 reads "dtype"; older readers (and Qwen's own files) "torch_dtype".
               dtype=name, torch_dtype=name)
    return out


def generation_config(tok: Tokenizer) -> dict:
    """Greedy, stop at <|im_end|>, pad <|endoftext|>: what NeMo's SALM.generate builds (it ignores the base
    LLM's sampling defaults, see the golden fixture's notes)."""
    return {"do_sample": False, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id, "bos_token_id": None}


def export_tokenizer(src: Path, dst: Path, audio_tag: str) -> Tokenizer:
    """Copy the tokenizer files with the audio tag added as a special token at the engine's id."""
    tok = Tokenizer.from_dir(src, audio_tag)  # adds the tag exactly as the engine's prompt does
    entry = {"content": audio_tag, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
    tj = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    if not any(t["content"] == audio_tag for t in tj["added_tokens"]):
        tj["added_tokens"].append({"id": tok.audio_id, **entry})
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=2), encoding="utf-8")
    tc = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").is_file() else {}
    tc.setdefault("added_tokens_decoder", {})[str(tok.audio_id)] = entry
    extra = tc.setdefault("additional_special_tokens", [])
    if audio_tag not in extra:
        extra.append(audio_tag)
    (dst / "tokenizer_config.json").write_text(json.dumps(tc, ensure_ascii=False, indent=2), encoding="utf-8")
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)
    written = Tokenizer.from_dir(dst, audio_tag)
    if written.audio_id != tok.audio_id or written.prompt_ids() != tok.prompt_ids():
        raise RuntimeError(f"{dst}: exported tokenizer gives audio id {written.audio_id}, expected {tok.audio_id}")
    return tok


def write_hf(out: Path, files: ModelFiles, cfg: ModelConfig, weights: dict[str, torch.Tensor],
             dtype: torch.dtype) -> Tokenizer:
    """Write ``out`` = config.json, generation_config.json, model.safetensors and the tokenizer files."""
    out.mkdir(parents=True, exist_ok=True)
    tok = export_tokenizer(files.tokenizer_dir, out, cfg.audio_locator_tag)
    (out / "config.json").write_text(json.dumps(hf_config(read_json(files.llm_config), cfg, dtype), indent=2))
    (out / "generation_config.json").write_text(json.dumps(generation_config(tok), indent=2))
    # "format": "pt" is what transformers checks for in a safetensors header.
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    return tok
