"""The decoder build: ``hf/`` + ``trtllm_ckpt/`` + (with TensorRT-LLM) ``engine/``, and their metadata.

Layout of a build folder (``build/build_decoder.py --output DIR``)::

    DIR/hf/                  plain Qwen3 checkpoint, LoRA merged (engine/export/hf.py)
    DIR/trtllm_ckpt/         TensorRT-LLM checkpoint: config.json + rank0.safetensors
    DIR/engine/              trtllm-build output (absent with --skip-engine or without tensorrt_llm)
    DIR/decoder_meta.json    what was built from what, with which sizes and tools; checked at load

Names, config fields and build options were read from TensorRT-LLM 1.2 sources (the last line with the
engine backend: Qwen3 in qwen/, nanobind executor bindings, pydantic PluginConfig, --kv_cache_type); each
use cites its file. Supported: 1.0 <= tensorrt_llm < 1.3 (``trtllm_version_problem``): Qwen3 on the engine
backend needs 1.0 (PR #5650), and 1.3 removed trtllm-build and the Executor. TensorRT-LLM itself is never imported here: the engine is built by the ``trtllm-build``
command in a subprocess, only when the package is installed.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import platform
import re
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.checkpoint import ModelFiles, file_sha256
from engine.config import LLMConfig, ModelConfig
from engine.encoder import subsampled_lengths
from engine.frontend import feature_lengths

from .hf import merged_llm_weights, write_hf

log = logging.getLogger(__name__)

HF_DIR, CKPT_DIR, ENGINE_DIR, META_FILE = "hf", "trtllm_ckpt", "engine", "decoder_meta.json"
META_FORMAT = "canary-trt/decoder/1"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# Room for a custom instruction longer than the default ASR prompt, in max_input_len (costs nothing at run time).
PROMPT_HEADROOM = 64
DEFAULT_MAX_NUM_TOKENS = 8192  # BuildConfig.max_num_tokens default (tensorrt_llm/builder.py, 1.2)


class DecoderBuildError(ValueError):
    """A build folder, its metadata and its engine do not fit together or do not fit this runtime."""


# ---- checkpoint ------------------------------------------------------------------------------------

def trtllm_config(llm: LLMConfig, dtype: str) -> dict:
    """config.json of the TensorRT-LLM checkpoint: what ``QWenConfig.from_hugging_face(...).to_dict()`` gives
    for a Qwen3 dense model (TensorRT-LLM 1.2, tensorrt_llm/models/qwen/config.py and
    models/modeling_utils.py: PretrainedConfig)."""
    return {
        "architecture": "Qwen3ForCausalLM",  # MODEL_MAP -> QWenForCausalLM (tensorrt_llm/models/__init__.py)
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size,
        "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_heads,
        "num_key_value_heads": llm.num_kv_heads,
        "head_size": llm.head_dim,
        "intermediate_size": llm.intermediate_size,
        "hidden_act": "silu",
        "norm_epsilon": llm.rms_norm_eps,
        "position_embedding_type": "rope_gpt_neox",
        "rotary_embedding_dim": llm.head_dim,  # PretrainedConfig's default: head_size * rotary_pct (1.0)
        "max_position_embeddings": llm.max_position_embeddings,
        "rotary_base": llm.rope_theta,
        "rotary_scaling": None,
        # qwen/model.py (QWenDecoderLayer) turns q/k RMSNorm on for this qwen_type, and reads seq_length
        # (logn-attention length; from_hugging_face defaults it to 8192 when the HF config has none).
        "qwen_type": "qwen3",
        "seq_length": 8192,
        "attn_bias": False,
        "mlp_bias": False,
        "use_logn_attn": False,
        "tie_word_embeddings": llm.tie_word_embeddings,
        "num_labels": 1,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": None, "kv_cache_quant_algo": None},
    }


def trtllm_weights(hf: dict[str, torch.Tensor], llm: LLMConfig) -> dict[str, torch.Tensor]:
    """Hugging Face Qwen3 names (LoRA already merged) -> TensorRT-LLM names, as qwen/convert.py
    (convert_hf_qwen, TensorRT-LLM 1.2) writes them for tp_size 1. Linear weights stay [out, in]."""
    embed = hf["model.embed_tokens.weight"]
    w = {
        "transformer.vocab_embedding.weight": embed,
        "transformer.ln_f.weight": hf["model.norm.weight"],
        # Written even when tied (convert.py: lm_head_weights = v.clone()); a clone, as safetensors
        # refuses two names on one storage.
        "lm_head.weight": hf.get("lm_head.weight", embed).clone(),
    }
    for i in range(llm.num_layers):
        src, dst = f"model.layers.{i}.", f"transformer.layers.{i}."
        attn = src + "self_attn."
        w[dst + "input_layernorm.weight"] = hf[src + "input_layernorm.weight"]
        # [(heads + 2 * kv_heads) * head_dim, hidden]: q rows, then k, then v.
        w[dst + "attention.qkv.weight"] = torch.cat(
            [hf[attn + "q_proj.weight"], hf[attn + "k_proj.weight"], hf[attn + "v_proj.weight"]], dim=0)
        w[dst + "attention.q_layernorm.weight"] = hf[attn + "q_norm.weight"]
        w[dst + "attention.k_layernorm.weight"] = hf[attn + "k_norm.weight"]
        w[dst + "attention.dense.weight"] = hf[attn + "o_proj.weight"]
        w[dst + "post_layernorm.weight"] = hf[src + "post_attention_layernorm.weight"]
        # GatedMLP (tensorrt_llm/layers/mlp.py): proj(act(fc(x)) * gate(x)), so fc is the activated
        # gate_proj and "gate" is up_proj.
        w[dst + "mlp.fc.weight"] = hf[src + "mlp.gate_proj.weight"]
        w[dst + "mlp.gate.weight"] = hf[src + "mlp.up_proj.weight"]
        w[dst + "mlp.proj.weight"] = hf[src + "mlp.down_proj.weight"]
    return w


def write_trtllm_checkpoint(out: Path, hf: dict[str, torch.Tensor], llm: LLMConfig, dtype: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(trtllm_config(llm, dtype), indent=2))
    save_file(trtllm_weights(hf, llm), str(out / "rank0.safetensors"))


# TensorRT-LLM's Attention layer builds the q/k RMSNorms that qwen_type "qwen3" turns on (PR #5650:
# qk_layernorm=True) with its own eps argument, default 1e-5, which QWenDecoderLayer does not set from the
# config; the checkpoint's norm_epsilon only reaches the layer norms, so nothing in it can change this. (From
# the source review of issue 16; the stored TensorRT-LLM attention.py read here predates Qwen3.)
TRTLLM_QK_NORM_EPS = 1e-5


def known_differences(llm: LLMConfig) -> dict:
    """How the engine's math differs from the model's, for decoder_meta.json and the parity tolerance."""
    return {"qk_norm_eps": {"engine": TRTLLM_QK_NORM_EPS, "model": llm.rms_norm_eps,
                            "why": "TensorRT-LLM's Attention q/k RMSNorm uses its default eps (1e-5); Qwen3 uses "
                                   "rms_norm_eps; the TensorRT-LLM checkpoint has no field for it"}}


# ---- engine sizes and build command ------------------------------------------------------------------

@dataclass(frozen=True)
class DecoderSizes:
    """Engine limits. Audio enters as prompt-table rows, one per encoder frame."""

    max_batch_size: int
    max_audio_seconds: float
    max_audio_frames: int  # encoder frames of the longest audio (40 s -> 500)
    prompt_len: int  # default ASR prompt without its audio tag
    max_input_len: int  # prompt + headroom + longest audio
    max_new_tokens: int
    max_seq_len: int  # max_input_len + max_new_tokens
    max_prompt_embedding_table_size: int  # every request of a full batch at the longest audio
    max_num_tokens: int  # tokens per engine step; one longest prompt must fit (no chunked context)


def audio_frames(cfg: ModelConfig, seconds: float) -> int:
    """Encoder frames of ``seconds`` of audio, by the frontend's and the subsampling's own length rules."""
    samples = torch.tensor([round(seconds * cfg.frontend.sample_rate)])
    return int(subsampled_lengths(cfg.encoder, feature_lengths(cfg.frontend, samples))[0])


def decoder_sizes(cfg: ModelConfig, prompt_len: int, max_batch_size: int, max_audio_seconds: float,
                  max_new_tokens: int) -> DecoderSizes:
    if max_batch_size < 1 or max_audio_seconds <= 0 or max_new_tokens < 1:
        raise ValueError("max_batch_size, max_audio_seconds and max_new_tokens must be positive")
    frames = audio_frames(cfg, max_audio_seconds)
    max_input = prompt_len + PROMPT_HEADROOM + frames
    return DecoderSizes(
        max_batch_size=max_batch_size, max_audio_seconds=max_audio_seconds, max_audio_frames=frames,
        prompt_len=prompt_len, max_input_len=max_input, max_new_tokens=max_new_tokens,
        max_seq_len=max_input + max_new_tokens, max_prompt_embedding_table_size=max_batch_size * frames,
        max_num_tokens=max(DEFAULT_MAX_NUM_TOKENS, max_input))


def engine_features(dtype: str) -> dict:
    """Fused attention kernels exist for fp16/bf16 only; paged context FMHA is what KV-cache block reuse
    and chunked context need (tensorrt_llm/plugin/plugin.py, PluginConfig field docs, 1.2)."""
    fmha = dtype != "float32"
    return {"context_fmha": fmha, "paged_context_fmha": fmha, "kv_cache_reuse": fmha}


def trtllm_build_executable() -> list[str]:
    exe = shutil.which("trtllm-build")
    # trtllm-build is the console script of tensorrt_llm.commands.build:main (which also runs as a module).
    return [exe] if exe else [sys.executable, "-m", "tensorrt_llm.commands.build"]


def build_command(ckpt_dir: Path, engine_dir: Path, sizes: DecoderSizes, dtype: str) -> list[str]:
    """trtllm-build arguments (tensorrt_llm/commands/build.py and plugin/plugin.py, 1.2). Plugins as the
    Qwen example builds bf16 (examples/models/core/qwen/README.md: gpt_attention and gemm plugins in the
    model dtype, "to prevent accuracy issue"); paged KV cache, packed (padding-free) inputs."""
    feat = engine_features(dtype)
    onoff = {True: "enable", False: "disable"}
    args = {
        "--checkpoint_dir": ckpt_dir, "--output_dir": engine_dir,
        "--max_batch_size": sizes.max_batch_size, "--max_beam_width": 1,
        "--max_input_len": sizes.max_input_len, "--max_seq_len": sizes.max_seq_len,
        "--max_num_tokens": sizes.max_num_tokens,
        "--max_prompt_embedding_table_size": sizes.max_prompt_embedding_table_size,
        "--kv_cache_type": "paged",  # replaces the deprecated --paged_kv_cache
        "--remove_input_padding": "enable",
        "--gpt_attention_plugin": dtype, "--gemm_plugin": dtype,
        "--context_fmha": onoff[feat["context_fmha"]],
        "--use_paged_context_fmha": onoff[feat["paged_context_fmha"]],
    }
    return trtllm_build_executable() + [str(x) for kv in args.items() for x in kv]


def trtllm_available() -> bool:
    """Installed (a cheap check: importing tensorrt_llm needs the CUDA driver library)."""
    return importlib.util.find_spec("tensorrt_llm") is not None


# TensorRT-LLM lines this engine path supports: Qwen3 on the engine-building (TensorRT) backend arrived with
# PR #5650 (merged July 2025, first released in 1.0); the 1.3 line removed trtllm-build, the Executor API and
# the C++ Triton backend that this path (and the Triton ensemble) use.
TRTLLM_MIN, TRTLLM_BELOW = (1, 0), (1, 3)
TORCH_DECODER_HINT = ("use the torch decoder instead (the default: --decoder torch / Engine(decoder='torch')), "
                      "or install tensorrt_llm>=1.0,<1.3 for the engine decoder")


def trtllm_version_problem(version: str | None) -> str | None:
    """Why an installed TensorRT-LLM cannot serve this engine path (None when 1.0 <= version < 1.3)."""
    if version is None:
        return f"tensorrt_llm is not installed: {TORCH_DECODER_HINT}"
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None:
        return f"tensorrt_llm {version}: unrecognised version; {TORCH_DECODER_HINT}"
    v = (int(m.group(1)), int(m.group(2)))
    if v < TRTLLM_MIN:
        return (f"tensorrt_llm {version} predates Qwen3 on the engine backend (PR #5650, in 1.0): "
                f"{TORCH_DECODER_HINT}")
    if v >= TRTLLM_BELOW:
        return (f"tensorrt_llm {version} has no trtllm-build, Executor API or C++ Triton backend (removed in "
                f"1.3): {TORCH_DECODER_HINT}")
    return None


def require_trtllm(version: str | None) -> None:
    if problem := trtllm_version_problem(version):
        raise DecoderBuildError(problem)


def missing_pieces(module, names: list[str]) -> list[str]:
    """Which of ``names`` a module lacks (a probe for the API a version gate cannot promise)."""
    return [n for n in names if not hasattr(module, n)]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def tool_versions() -> dict:
    return {"canary_trt": _version("canary-trt"), "python": platform.python_version(), "torch": torch.__version__,
            "safetensors": _version("safetensors"), "tokenizers": _version("tokenizers"),
            "tensorrt_llm": _version("tensorrt_llm"), "tensorrt": _version("tensorrt")}


def build_engine(command: list[str]) -> dict:
    """Run trtllm-build (its log goes to this process's stdout/stderr: builds take minutes); returns the
    engine's provenance for the metadata."""
    log.info("running %s", " ".join(command))
    code = subprocess.run(command).returncode
    if code != 0:
        raise RuntimeError(f"trtllm-build failed (exit {code}); its log is above. Command: {' '.join(command)}")
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    cc = list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
    return {"tensorrt_llm": _version("tensorrt_llm"), "gpu": gpu, "compute_capability": cc}


# ---- metadata --------------------------------------------------------------------------------------

def read_metadata(build_dir: Path) -> dict:
    path = Path(build_dir) / META_FILE
    if not path.is_file():
        raise DecoderBuildError(f"{path}: missing (make the folder with build/build_decoder.py)")
    meta = json.loads(path.read_text())
    if meta.get("format") != META_FORMAT:
        raise DecoderBuildError(f"{path}: format {meta.get('format')!r}, expected {META_FORMAT!r}")
    return meta


def check_engine(meta: dict, engine_config: dict, trtllm_version: str | None,
                 compute_capability: list[int] | None, expected_weights_sha256: str | None = None) -> None:
    """Refuse an engine that is not the one the metadata describes, or that this runtime cannot run.

    engine_config: the engine folder's config.json ({"pretrained_config": ..., "build_config": ...}).
    """
    problems = []
    eng = meta.get("engine")
    if eng is None:
        raise DecoderBuildError("no engine in this build (built with --skip-engine or without tensorrt_llm)")
    if expected_weights_sha256 and expected_weights_sha256 != meta["source"]["weights_sha256"]:
        problems.append(f"built from weights {meta['source']['weights_sha256'][:12]}..., "
                        f"expected {expected_weights_sha256[:12]}...")
    if trtllm_version != eng["tensorrt_llm"]:  # engines are not portable across TensorRT-LLM versions
        problems.append(f"built with tensorrt_llm {eng['tensorrt_llm']}, running {trtllm_version}")
    if eng["compute_capability"] and compute_capability and list(compute_capability) != eng["compute_capability"]:
        problems.append(f"built for compute capability {eng['compute_capability']} ({eng['gpu']}), "
                        f"this GPU has {list(compute_capability)}")
    pretrained, build = engine_config.get("pretrained_config", {}), engine_config.get("build_config", {})
    expect = [(pretrained, "dtype", meta["dtype"]), (pretrained, "vocab_size", meta["llm"]["vocab_size"]),
              (pretrained, "hidden_size", meta["llm"]["hidden_size"])]
    expect += [(build, k, meta["sizes"][k]) for k in ("max_batch_size", "max_input_len", "max_seq_len",
                                                      "max_prompt_embedding_table_size")]
    for section, key, value in expect:
        if section.get(key) != value:
            problems.append(f"engine {key}={section.get(key)!r}, metadata says {value!r}")
    if problems:
        raise DecoderBuildError("engine does not fit its metadata or this runtime:\n  " + "\n  ".join(problems))


# ---- the whole build ----------------------------------------------------------------------------------

def export_decoder(files: ModelFiles, output: Path, dtype: str = "bfloat16", max_batch_size: int = 32,
                   max_audio_seconds: float = 40.0, max_new_tokens: int = 256, skip_engine: bool = False) -> dict:
    """Write hf/, trtllm_ckpt/, the metadata and, when possible, the engine. Returns the metadata."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {list(DTYPES)}")
    output = Path(output)
    cfg, weights = merged_llm_weights(files, DTYPES[dtype])
    tok = write_hf(output / HF_DIR, files, cfg, weights, DTYPES[dtype])
    write_trtllm_checkpoint(output / CKPT_DIR, weights, cfg.llm, dtype)
    del weights
    prompt = tok.prompt_ids()
    sizes = decoder_sizes(cfg, len(prompt) - 1, max_batch_size, max_audio_seconds, max_new_tokens)
    command = build_command(output / CKPT_DIR, output / ENGINE_DIR, sizes, dtype)
    lora = cfg.lora
    meta = {
        "format": META_FORMAT,
        "dtype": dtype,
        "source": {"model_dir": str(files.model_dir.resolve()), "weights_sha256": file_sha256(files.weights),
                   "llm_config": str(files.llm_config.resolve()), "llm_config_sha256": file_sha256(files.llm_config)},
        "llm": {"vocab_size": cfg.llm.vocab_size, "hidden_size": cfg.llm.hidden_size,
                "num_layers": cfg.llm.num_layers, "num_heads": cfg.llm.num_heads,
                "num_kv_heads": cfg.llm.num_kv_heads, "head_dim": cfg.llm.head_dim,
                "intermediate_size": cfg.llm.intermediate_size,
                "tie_word_embeddings": cfg.llm.tie_word_embeddings},
        "lora": None if lora is None else {"r": lora.r, "alpha": lora.alpha,
                                           "target_modules": list(lora.target_modules), "merged_in": "float32"},
        "tokens": {"audio_id": tok.audio_id, "eos_id": tok.eos_id, "pad_id": tok.pad_id, "prompt_ids": prompt},
        "sizes": asdict(sizes),
        "features": engine_features(dtype),
        "known_differences": known_differences(cfg.llm),
        "tools": tool_versions(),
        "trtllm_build": command,
        "engine": None,
    }
    if skip_engine:
        log.info("--skip-engine: engine not built; command: %s", " ".join(command))
    elif not trtllm_available():
        log.warning("tensorrt_llm is not installed: engine not built. On a machine with tensorrt_llm>=1.0,<1.3, "
                    "run:\n  %s", " ".join(command))
    else:
        require_trtllm(_version("tensorrt_llm"))
        if not (shutil.which("trtllm-build") or importlib.util.find_spec("tensorrt_llm.commands.build")):
            raise DecoderBuildError(f"tensorrt_llm {_version('tensorrt_llm')} has no trtllm-build: "
                                    f"{TORCH_DECODER_HINT}")
        meta["engine"] = build_engine(command)
        meta["tools"] = tool_versions()
        engine_config = json.loads((output / ENGINE_DIR / "config.json").read_text())
        check_engine(meta, engine_config, meta["engine"]["tensorrt_llm"], meta["engine"]["compute_capability"])
    (output / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta
