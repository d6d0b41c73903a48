"""``canary-trt triton-repo OUTPUT``: write a Triton model repository.

Always ``canary_qwen``: a decoupled Python-backend model running the canary-trt engine (in-flight batching,
streaming, cancellation; models/canary_qwen.py). With ``engine_dir`` (a build/build_decoder.py folder) it runs
the TensorRT-LLM decoder, and the repository also gets TensorRT-LLM's multimodal ensemble layout for users of
the tensorrtllm backend: ``preprocessing`` -> ``multimodal_encoders`` (emits the prompt-embedding table) ->
``tensorrt_llm`` -> ``postprocessing``, wired by ``ensemble``. Input and parameter names of the tensorrt_llm
model follow tensorrtllm_backend's all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt and the
multimodal ensemble in all_models/multimodal.

Triton reads each ``config.pbtxt`` (protobuf text format of ModelConfig, model_config.proto).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

MODELS_SRC = Path(__file__).resolve().parent / "models"
PYTHON_MODELS = ("canary_qwen", "preprocessing", "multimodal_encoders", "postprocessing")
ENSEMBLE = "ensemble"


def _quote(value: str) -> str:
    """A protobuf text-format string literal (JSON's escapes minus \\uXXXX, which the format lacks)."""
    return json.dumps(str(value), ensure_ascii=False)


def _tensors(kind: str, specs: list[tuple]) -> str:
    """``input [...]`` / ``output [...]`` from (name, type, dims[, options]) tuples."""
    rows = []
    for name, dtype, dims, *options in specs:
        extra = "".join(f" {o}" for o in options)
        rows.append(f'  {{ name: "{name}" data_type: {dtype} dims: [ {", ".join(map(str, dims))} ]{extra} }}')
    return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"


def _parameters(params: dict) -> str:
    return "".join(f'parameters {{ key: "{k}" value: {{ string_value: {_quote(v)} }} }}\n'
                   for k, v in params.items())


def _python_model(name: str, max_batch_size: int, inputs: list, outputs: list, params: dict,
                  decoupled: bool = False) -> str:
    # KIND_CPU: one Python process per instance; the model itself places its work on the GPU it is told.
    text = f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
    if decoupled:
        text += "model_transaction_policy { decoupled: true }\n"
    return (text + _tensors("input", inputs) + _tensors("output", outputs)
            + "instance_group [ { count: 1 kind: KIND_CPU } ]\n" + _parameters(params))


def canary_qwen_config(engine: dict, engine_factory: str | None = None) -> str:
    """The decoupled Python model; ``engine``: Engine.from_pretrained keywords (runtime.options.engine_kwargs)."""
    inputs = [("AUDIO", "TYPE_STRING", [1], "optional: true"), ("SAMPLES", "TYPE_FP32", [-1], "optional: true"),
              ("SAMPLE_RATE", "TYPE_INT32", [1], "optional: true"),
              ("MAX_NEW_TOKENS", "TYPE_INT32", [1], "optional: true"), ("STREAM", "TYPE_BOOL", [1], "optional: true")]
    outputs = [("TEXT", "TYPE_STRING", [1]), ("TOKEN_IDS", "TYPE_INT32", [-1]), ("FINISH_REASON", "TYPE_STRING", [1])]
    params = {"engine": json.dumps(engine)}
    if engine_factory:
        params["engine_factory"] = engine_factory
    # max_batch_size 0: requests go to the engine one by one and it batches them itself, step by step.
    return _python_model("canary_qwen", 0, inputs, outputs, params, decoupled=True)


def ensemble_configs(engine: dict, gpt_model_path: str, max_batch_size: int, kv_cache_reuse: bool) -> dict[str, str]:
    """config.pbtxt of the five ensemble models, by model name."""
    model = {"model": engine["model"], "llm": engine["llm"] or ""}
    b = max_batch_size
    configs = {
        "preprocessing": _python_model(
            "preprocessing", b,
            [("AUDIO", "TYPE_STRING", [1]), ("MAX_TOKENS", "TYPE_INT32", [1], "optional: true")],
            [("AUDIO_SAMPLES", "TYPE_FP32", [-1]), ("INPUT_ID", "TYPE_INT32", [-1]),
             ("REQUEST_INPUT_LEN", "TYPE_INT32", [1]), ("REQUEST_OUTPUT_LEN", "TYPE_INT32", [1]),
             ("OUT_END_ID", "TYPE_INT32", [1]), ("OUT_PAD_ID", "TYPE_INT32", [1]),
             ("OUT_PROMPT_TABLE_EXTRA_IDS", "TYPE_UINT64", [-1])],
            {**model, "max_new_tokens": str(engine["max_new_tokens"])}),
        "multimodal_encoders": _python_model(
            "multimodal_encoders", b, [("AUDIO_SAMPLES", "TYPE_FP32", [-1])],
            # fp16: the Python backend has no bf16; the tensorrt_llm backend casts the table to the engine's dtype
            [("OUT_PROMPT_EMBEDDING_TABLE", "TYPE_FP16", [-1, -1]), ("OUT_PROMPT_VOCAB_SIZE", "TYPE_INT32", [1])],
            {"encoder": json.dumps({k: engine[k] for k in ("model", "llm", "device", "dtype", "encoder", "artifacts")})}),
        "postprocessing": _python_model(
            "postprocessing", b, [("TOKENS_BATCH", "TYPE_INT32", [-1, -1]), ("SEQUENCE_LENGTH", "TYPE_INT32", [-1])],
            [("TEXT", "TYPE_STRING", [-1])], model),
        "tensorrt_llm": tensorrt_llm_config(gpt_model_path, b, kv_cache_reuse, engine["cuda_graphs"]),
    }
    configs[ENSEMBLE] = ensemble_config(b)
    return configs


def tensorrt_llm_config(gpt_model_path: str, max_batch_size: int, kv_cache_reuse: bool, cuda_graphs: bool) -> str:
    scalar = 'reshape: { shape: [ ] }'
    inputs = [("input_ids", "TYPE_INT32", [-1], "allow_ragged_batch: true"),
              ("input_lengths", "TYPE_INT32", [1], scalar), ("request_output_len", "TYPE_INT32", [1]),
              ("end_id", "TYPE_INT32", [1], scalar, "optional: true"),
              ("pad_id", "TYPE_INT32", [1], scalar, "optional: true"),
              ("streaming", "TYPE_BOOL", [1], "optional: true"),
              ("prompt_embedding_table", "TYPE_FP16", [-1, -1], "optional: true", "allow_ragged_batch: true"),
              ("prompt_vocab_size", "TYPE_INT32", [1], scalar, "optional: true"),
              ("prompt_table_extra_ids", "TYPE_UINT64", [-1], "optional: true", "allow_ragged_batch: true")]
    outputs = [("output_ids", "TYPE_INT32", [-1, -1]), ("sequence_length", "TYPE_INT32", [-1])]
    params = {"gpt_model_type": "inflight_fused_batching", "gpt_model_path": gpt_model_path,
              "batch_scheduler_policy": "guaranteed_no_evict", "kv_cache_free_gpu_mem_fraction": "0.8",
              # reuse needs the extra ids (preprocessing sends them) and an engine built for it
              "enable_kv_cache_reuse": "true" if kv_cache_reuse else "false",
              "exclude_input_in_output": "true", "max_beam_width": "1",
              "cuda_graph_mode": "true" if cuda_graphs else "false"}
    return (f'name: "tensorrt_llm"\nbackend: "tensorrtllm"\nmax_batch_size: {max_batch_size}\n'
            "model_transaction_policy { decoupled: true }\n"
            f"dynamic_batching {{ preferred_batch_size: [ {max_batch_size} ] max_queue_delay_microseconds: 0 }}\n"
            + _tensors("input", inputs) + _tensors("output", outputs)
            + "instance_group [ { count: 1 kind: KIND_CPU } ]\n" + _parameters(params))


def ensemble_config(max_batch_size: int) -> str:
    def step(model: str, inputs: dict, outputs: dict) -> str:
        maps = "".join(f'      input_map {{ key: "{k}" value: "{v}" }}\n' for k, v in inputs.items())
        maps += "".join(f'      output_map {{ key: "{k}" value: "{v}" }}\n' for k, v in outputs.items())
        return f'    {{\n      model_name: "{model}"\n      model_version: -1\n{maps}    }}'

    steps = [
        step("preprocessing", {"AUDIO": "AUDIO", "MAX_TOKENS": "MAX_TOKENS"},
             {k: f"_{k}" for k in ("AUDIO_SAMPLES", "INPUT_ID", "REQUEST_INPUT_LEN", "REQUEST_OUTPUT_LEN",
                                   "OUT_END_ID", "OUT_PAD_ID", "OUT_PROMPT_TABLE_EXTRA_IDS")}),
        step("multimodal_encoders", {"AUDIO_SAMPLES": "_AUDIO_SAMPLES"},
             {"OUT_PROMPT_EMBEDDING_TABLE": "_PROMPT_EMBEDDING_TABLE", "OUT_PROMPT_VOCAB_SIZE": "_PROMPT_VOCAB_SIZE"}),
        step("tensorrt_llm",
             {"input_ids": "_INPUT_ID", "input_lengths": "_REQUEST_INPUT_LEN",
              "request_output_len": "_REQUEST_OUTPUT_LEN", "end_id": "_OUT_END_ID", "pad_id": "_OUT_PAD_ID",
              "streaming": "STREAM", "prompt_embedding_table": "_PROMPT_EMBEDDING_TABLE",
              "prompt_vocab_size": "_PROMPT_VOCAB_SIZE", "prompt_table_extra_ids": "_OUT_PROMPT_TABLE_EXTRA_IDS"},
             {"output_ids": "_TOKENS_BATCH", "sequence_length": "_SEQUENCE_LENGTH"}),
        step("postprocessing", {"TOKENS_BATCH": "_TOKENS_BATCH", "SEQUENCE_LENGTH": "_SEQUENCE_LENGTH"},
             {"TEXT": "TEXT"}),
    ]
    inputs = [("AUDIO", "TYPE_STRING", [1]), ("MAX_TOKENS", "TYPE_INT32", [1], "optional: true"),
              ("STREAM", "TYPE_BOOL", [1], "optional: true")]
    return (f'name: "{ENSEMBLE}"\nplatform: "ensemble"\nmax_batch_size: {max_batch_size}\n'
            + _tensors("input", inputs) + _tensors("output", [("TEXT", "TYPE_STRING", [-1])])
            + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n")


def write_repository(output: str | Path, engine: dict, engine_dir: str | Path | None = None,
                     engine_factory: str | None = None, max_batch_size: int = 64,
                     kv_cache_reuse: bool = False) -> list[str]:
    """Write the repository into ``output`` (created; existing model folders are replaced) and return the
    model names. ``engine``: Engine.from_pretrained keywords (model, llm, device, dtype, encoder, artifacts,
    EngineOptions fields). ``engine_dir``: a build/build_decoder.py folder: canary_qwen then decodes with
    TensorRT-LLM and the ensemble is written too, sized by ``max_batch_size``."""
    from engine.export.trtllm import ENGINE_DIR

    output = Path(output)
    engine = dict(engine)
    for key in ("model", "llm", "artifacts"):  # Triton runs the models from another working directory
        if engine.get(key) and Path(engine[key]).exists():
            engine[key] = str(Path(engine[key]).resolve())
    configs = {}
    if engine_dir is not None:
        engine_dir = Path(engine_dir).resolve()
        engine.update(decoder="trtllm", decoder_dir=str(engine_dir))
        configs.update(ensemble_configs(engine, str(engine_dir / ENGINE_DIR), max_batch_size, kv_cache_reuse))
    configs["canary_qwen"] = canary_qwen_config(engine, engine_factory)
    for name, text in configs.items():
        folder = output / name
        if folder.exists():
            shutil.rmtree(folder)
        (folder / "1").mkdir(parents=True)  # version 1; the ensemble and tensorrt_llm folders stay empty
        (folder / "config.pbtxt").write_text(text, encoding="utf-8")
        if name in PYTHON_MODELS:
            shutil.copy(MODELS_SRC / f"{name}.py", folder / "1" / "model.py")
    return sorted(configs)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``canary-trt triton-repo``."""
    from ..options import add_engine_arguments

    parser.add_argument("output", help="folder to write the model repository into")
    add_engine_arguments(parser)  # with --engine-dir the tensorrtllm-backend ensemble is written too
    parser.add_argument("--engine-factory", default=None,
                        help="module:function making the Engine from the same keywords (custom backends)")


def run(args: argparse.Namespace) -> int:
    """``canary-trt triton-repo``."""
    from ..options import engine_kwargs

    batch, reuse = args.max_batch_size, False
    if args.engine_dir is not None:
        from engine.backends.decoder_trtllm import EngineInfo
        from engine.export.trtllm import DecoderBuildError, read_metadata

        try:
            info = EngineInfo.from_meta(read_metadata(Path(args.engine_dir)))
        except (DecoderBuildError, OSError, KeyError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        batch, reuse = info.max_batch_size, info.kv_cache_reuse
    names = write_repository(args.output, engine_kwargs(args), args.engine_dir, args.engine_factory, batch, reuse)
    print(f"wrote {', '.join(names)} to {args.output}; serve with: tritonserver --model-repository {args.output}")
    return 0
