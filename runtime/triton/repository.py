"""``canary-trt triton-repo OUTPUT``: write a Triton model repository.

``canary_qwen``: a decoupled Python-backend model running the canary-trt engine (in-flight batching,
streaming, cancellation; models/canary_qwen.py); ``parakeet_tdt``: the same for Parakeet-TDT
(runtime.parakeet.ParakeetEngine; models/parakeet_tdt.py), with word and segment timestamps. Either or both:
``--model`` of either family, ``--parakeet`` for a Parakeet-TDT model next to Canary-Qwen. With ``engine_dir``
(a build/build_decoder.py folder) canary_qwen runs the TensorRT-LLM decoder, and the repository also gets
TensorRT-LLM's multimodal ensemble layout for users of the tensorrtllm backend: ``preprocessing`` ->
``multimodal_encoders`` (emits the prompt-embedding table) -> ``tensorrt_llm`` -> ``postprocessing``, wired by
``ensemble``. Input and parameter names of the tensorrt_llm model follow tensorrtllm_backend's
all_models/inflight_batcher_llm/tensorrt_llm/config.pbtxt and the multimodal ensemble in all_models/multimodal.

Triton reads each ``config.pbtxt`` (protobuf text format of ModelConfig, model_config.proto).

The ensemble needs the tensorrtllm backend of TensorRT-LLM 1.0-1.2 (the C++ backend is gone from 1.3), and
its ``tensorrt_llm`` model is decoupled (streamed responses), so the ensemble answers over a gRPC stream
only: HTTP ``/infer`` and unary gRPC calls fail. The prompt table travels in the engine's dtype (read from
decoder_meta.json): the backend passes it through unchanged, and TensorRT-LLM refuses a table whose dtype
differs from the model's (PromptTuningBuffers::validate).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

MODELS_SRC = Path(__file__).resolve().parent / "models"
PYTHON_MODELS = ("canary_qwen", "parakeet_tdt", "preprocessing", "multimodal_encoders", "postprocessing")
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


def instance_group(count: int = 1, gpus: list[int] | None = None) -> str:
    """``count`` instances on each GPU of ``gpus`` (KIND_GPU), or ``count`` instances of kind KIND_CPU without
    ``gpus``. Each Python-backend instance is a process of its own holding its own Engine; a KIND_GPU one
    builds it on its GPU (models/canary_qwen.py), a KIND_CPU one on the configured device."""
    if count < 1:
        raise ValueError(f"instances per device must be >= 1, got {count}")
    if gpus:
        if len(set(gpus)) != len(gpus) or min(gpus) < 0:
            raise ValueError(f"--gpus must list distinct GPU indices >= 0, got {gpus}")
        return f"instance_group [ {{ count: {count} kind: KIND_GPU gpus: [ {', '.join(map(str, gpus))} ] }} ]\n"
    return f"instance_group [ {{ count: {count} kind: KIND_CPU }} ]\n"


def _python_model(name: str, max_batch_size: int, inputs: list, outputs: list, params: dict,
                  decoupled: bool = False, instances: str | None = None) -> str:
    # Default KIND_CPU: one Python process; the model itself places its work on the GPU it is told.
    text = f'name: "{name}"\nbackend: "python"\nmax_batch_size: {max_batch_size}\n'
    if decoupled:
        text += "model_transaction_policy { decoupled: true }\n"
    return (text + _tensors("input", inputs) + _tensors("output", outputs)
            + (instances or instance_group()) + _parameters(params))


# The inputs and outputs every engine model has (runtime/triton/engine_model.py).
ENGINE_INPUTS = [("AUDIO", "TYPE_STRING", [1], "optional: true"), ("SAMPLES", "TYPE_FP32", [-1], "optional: true"),
                 ("SAMPLE_RATE", "TYPE_INT32", [1], "optional: true"), ("STREAM", "TYPE_BOOL", [1], "optional: true")]
ENGINE_OUTPUTS = [("TEXT", "TYPE_STRING", [1]), ("TOKEN_IDS", "TYPE_INT32", [-1]),
                  ("FINISH_REASON", "TYPE_STRING", [1])]
# ParakeetEngine.from_pretrained keywords among engine_kwargs' (the rest are Canary-Qwen's own).
PARAKEET_KEYS = ("model", "device", "dtype", "encoder", "artifacts", "max_batch_size", "max_queue", "cuda_graphs")


def _engine_model(name: str, engine: dict, engine_factory: str | None, instances: str | None,
                  inputs: list = (), outputs: list = ()) -> str:
    params = {"engine": json.dumps(engine)}
    if engine_factory:
        params["engine_factory"] = engine_factory
    # max_batch_size 0: requests go to the engine one by one and it batches them itself, step by step.
    return _python_model(name, 0, ENGINE_INPUTS + list(inputs), ENGINE_OUTPUTS + list(outputs), params,
                         decoupled=True, instances=instances)


def canary_qwen_config(engine: dict, engine_factory: str | None = None, instances: str | None = None) -> str:
    """The decoupled Python model; ``engine``: Engine.from_pretrained keywords (runtime.options.engine_kwargs);
    ``instances``: its ``instance_group`` (default: one KIND_CPU instance)."""
    return _engine_model("canary_qwen", engine, engine_factory, instances,
                         inputs=[("MAX_NEW_TOKENS", "TYPE_INT32", [1], "optional: true")])


def parakeet_kwargs(engine: dict, model: str | None = None, artifacts: str | None = None) -> dict:
    """ParakeetEngine.from_pretrained keywords from engine_kwargs' (``engine``): the same device, dtype, batch
    and queue sizes; ``model``: another model than ``engine["model"]`` (``--parakeet``), with its own encoder
    ``artifacts`` (python -m engine.export.tdt_onnx), the torch encoder without them."""
    kwargs = {k: engine[k] for k in PARAKEET_KEYS}
    if model is not None:
        kwargs.update(model=str(model), artifacts=artifacts and str(artifacts),
                      encoder=engine["encoder"] if artifacts else "torch")
    return kwargs


def parakeet_tdt_config(engine: dict, engine_factory: str | None = None, instances: str | None = None) -> str:
    """The decoupled Python model of Parakeet-TDT; ``engine``: ParakeetEngine.from_pretrained keywords
    (parakeet_kwargs). WORDS and SEGMENTS: JSON, one element each (models/parakeet_tdt.py)."""
    return _engine_model("parakeet_tdt", engine, engine_factory, instances,
                         outputs=[("WORDS", "TYPE_STRING", [1]), ("SEGMENTS", "TYPE_STRING", [1])])


# decoder_meta.json dtype -> Triton data type of the prompt table (and the torch dtype it is made in).
TABLE_TYPES = {"bfloat16": "TYPE_BF16", "float16": "TYPE_FP16", "float32": "TYPE_FP32"}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Share of the GPU memory free when the tensorrt_llm model loads that its KV cache may take at most; the
# token cap (kv_cache_plan) normally binds first. Triton loads models in any order, so the rest must hold
# multimodal_encoders (perception weights ~1.7 GB in bf16 plus one clip's activations) if it loads later.
KV_FRACTION = 0.5


def kv_cache_plan(meta: dict) -> dict:
    """The tensorrt_llm KV cache, sized from decoder_meta.json: tokens for every request of a full batch at
    max_seq_len (more are never in use at once), and what they cost. Bytes per token: layers x kv_heads x
    head_dim x 2 (k and v) x dtype bytes; Qwen3-1.7B in bf16: 28 x 8 x 128 x 2 x 2 = 114,688 B (112 KiB), so
    a 32 x 835-token build needs 26,720 tokens = 3.1 GB. TensorRT-LLM uses the smaller of this cap and
    ``KV_FRACTION`` of the free memory."""
    llm, sizes = meta["llm"], meta["sizes"]
    per_token = llm["num_layers"] * llm["num_kv_heads"] * llm["head_dim"] * 2 * DTYPE_BYTES[meta["dtype"]]
    tokens = sizes["max_batch_size"] * sizes["max_seq_len"]
    return {"max_tokens": tokens, "bytes_per_token": per_token, "bytes": tokens * per_token}


def ensemble_configs(engine: dict, decoder_meta: dict, gpt_model_path: str) -> dict[str, str]:
    """config.pbtxt of the five ensemble models, by model name (``decoder_meta``: the build's
    decoder_meta.json, which sizes the batch, the prompt table's dtype and the KV cache)."""
    model = {"model": engine["model"], "llm": engine["llm"] or ""}
    b = decoder_meta["sizes"]["max_batch_size"]
    table = TABLE_TYPES[decoder_meta["dtype"]]
    encoder = {k: engine[k] for k in ("model", "device", "encoder", "artifacts")}
    encoder["dtype"] = decoder_meta["dtype"]  # the table's: the engine's own dtype
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
            # The engine's dtype: sent through DLPack (the Python backend has bf16 only that way, not in numpy).
            [("OUT_PROMPT_EMBEDDING_TABLE", table, [-1, -1]), ("OUT_PROMPT_VOCAB_SIZE", "TYPE_INT32", [1])],
            {"encoder": json.dumps(encoder)}),
        "postprocessing": _python_model(
            "postprocessing", b, [("TOKENS_BATCH", "TYPE_INT32", [-1, -1]), ("SEQUENCE_LENGTH", "TYPE_INT32", [-1])],
            [("TEXT", "TYPE_STRING", [-1])], model),
        "tensorrt_llm": tensorrt_llm_config(gpt_model_path, b, decoder_meta["features"]["kv_cache_reuse"],
                                            engine["cuda_graphs"], table, kv_cache_plan(decoder_meta)),
    }
    configs[ENSEMBLE] = ensemble_config(b)
    return configs


def tensorrt_llm_config(gpt_model_path: str, max_batch_size: int, kv_cache_reuse: bool, cuda_graphs: bool,
                        table_type: str, kv: dict) -> str:
    scalar = 'reshape: { shape: [ ] }'
    inputs = [("input_ids", "TYPE_INT32", [-1], "allow_ragged_batch: true"),
              ("input_lengths", "TYPE_INT32", [1], scalar), ("request_output_len", "TYPE_INT32", [1]),
              ("end_id", "TYPE_INT32", [1], scalar, "optional: true"),
              ("pad_id", "TYPE_INT32", [1], scalar, "optional: true"),
              ("streaming", "TYPE_BOOL", [1], "optional: true"),
              ("prompt_embedding_table", table_type, [-1, -1], "optional: true", "allow_ragged_batch: true"),
              ("prompt_vocab_size", "TYPE_INT32", [1], scalar, "optional: true"),
              ("prompt_table_extra_ids", "TYPE_UINT64", [-1], "optional: true", "allow_ragged_batch: true")]
    outputs = [("output_ids", "TYPE_INT32", [-1, -1]), ("sequence_length", "TYPE_INT32", [-1])]
    params = {"gpt_model_type": "inflight_fused_batching", "gpt_model_path": gpt_model_path,
              "batch_scheduler_policy": "guaranteed_no_evict",
              # see kv_cache_plan: the smaller of the two binds
              "max_tokens_in_paged_kv_cache": str(kv["max_tokens"]),
              "kv_cache_free_gpu_mem_fraction": str(KV_FRACTION),
              # reuse needs the extra ids (preprocessing sends them) and an engine built for it
              "enable_kv_cache_reuse": "true" if kv_cache_reuse else "false",
              "exclude_input_in_output": "true", "max_beam_width": "1",
              "cuda_graph_mode": "true" if cuda_graphs else "false",
              # Without it the backend keeps 0 graphs and re-captures every step: one per batch size.
              "cuda_graph_cache_size": str(max_batch_size if cuda_graphs else 0)}
    gib = kv["bytes"] / (1 << 30)
    return (f'name: "tensorrt_llm"\nbackend: "tensorrtllm"\nmax_batch_size: {max_batch_size}\n'
            "# Decoupled (streamed responses): call the ensemble over a gRPC stream; HTTP /infer and unary gRPC\n"
            "# calls fail with a decoupled model in the path.\n"
            f"# KV cache: at most {kv['max_tokens']} tokens x {kv['bytes_per_token']} B = {gib:.2f} GiB, or\n"
            f"# {KV_FRACTION} of the free GPU memory if smaller (runtime/triton/repository.py: kv_cache_plan).\n"
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
            "# tensorrt_llm is decoupled: call over a gRPC stream (HTTP /infer and unary gRPC fail).\n"
            + _tensors("input", inputs) + _tensors("output", [("TEXT", "TYPE_STRING", [-1])])
            + "ensemble_scheduling {\n  step [\n" + ",\n".join(steps) + "\n  ]\n}\n")


def _absolute(engine: dict) -> dict:
    engine = dict(engine)
    for key in ("model", "llm", "artifacts"):  # Triton runs the models from another working directory
        if engine.get(key) and Path(engine[key]).exists():
            engine[key] = str(Path(engine[key]).resolve())
    return engine


def write_repository(output: str | Path, engine: dict | None, engine_dir: str | Path | None = None,
                     engine_factory: str | None = None, instances: str | None = None,
                     parakeet: dict | None = None, parakeet_factory: str | None = None) -> list[str]:
    """Write the repository into ``output`` (created; existing model folders are replaced) and return the
    model names. ``engine``: Engine.from_pretrained keywords (model, llm, device, dtype, encoder, artifacts,
    EngineOptions fields), or None for no canary_qwen. ``engine_dir``: a build/build_decoder.py folder:
    canary_qwen then decodes with TensorRT-LLM and the ensemble is written too, sized by its decoder_meta.json
    (raises DecoderBuildError without one). ``parakeet``: ParakeetEngine.from_pretrained keywords
    (parakeet_kwargs) of a ``parakeet_tdt`` model. ``engine_factory`` / ``parakeet_factory``: "module:function"
    making each model's engine from its keywords instead of from_pretrained. ``instances``: both models'."""
    from engine.export.trtllm import ENGINE_DIR, read_metadata

    if engine is None and engine_dir is not None:
        raise ValueError("engine_dir is a Canary-Qwen decoder build: it needs the canary_qwen engine")
    output = Path(output)
    configs = {}
    if engine is not None:
        engine = _absolute(engine)
        if engine_dir is not None:
            engine_dir = Path(engine_dir).resolve()
            engine.update(decoder="trtllm", decoder_dir=str(engine_dir))
            configs.update(ensemble_configs(engine, read_metadata(engine_dir), str(engine_dir / ENGINE_DIR)))
        configs["canary_qwen"] = canary_qwen_config(engine, engine_factory, instances)
    if parakeet is not None:
        configs["parakeet_tdt"] = parakeet_tdt_config(_absolute(parakeet), parakeet_factory, instances)
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
    parser.add_argument("--parakeet", default=None, metavar="MODEL",
                        help="also write parakeet_tdt for this Parakeet-TDT release (hub id, .nemo file or folder), "
                             "with the same device, dtype, batch and queue flags; a Parakeet-TDT --model writes "
                             "parakeet_tdt alone")
    parser.add_argument("--parakeet-artifacts", default=None, metavar="DIR",
                        help="encoder artifacts of --parakeet (python -m engine.export.tdt_onnx; default: torch)")
    parser.add_argument("--engine-factory", default=None,
                        help="module:function making --model's engine from the same keywords (custom backends)")
    parser.add_argument("--gpus", default=None, metavar="0,1,...",
                        help="canary_qwen / parakeet_tdt instances on these GPUs (KIND_GPU), each with its own "
                             "engine on its GPU")
    parser.add_argument("--instances-per-gpu", "--instances", dest="instances", type=int, default=1,
                        help="instances of each engine model on each GPU of --gpus, or on CPU (KIND_CPU) without it "
                             "(default: 1)")


def run(args: argparse.Namespace) -> int:
    """``canary-trt triton-repo``."""
    from ..options import engine_kwargs
    from ..parakeet import is_parakeet

    from engine.export.trtllm import DecoderBuildError

    try:
        if args.gpus and not all(g.strip().isdigit() for g in args.gpus.split(",")):
            raise ValueError(f"--gpus takes comma-separated GPU indices (0,1,...), got {args.gpus!r}")
        gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else None
        if gpus and args.device == "cpu":
            raise ValueError("--gpus places the engines on GPUs: drop --device cpu")
        instances = instance_group(args.instances, gpus)
    except ValueError as e:
        print(f"error: bad --gpus/--instances-per-gpu: {e}", file=sys.stderr)
        return 2
    engine, parakeet, factories = engine_kwargs(args), None, (args.engine_factory, None)
    if is_parakeet(args.model):  # a Parakeet-TDT --model: parakeet_tdt alone, with the --encoder/--artifacts given
        if args.engine_dir or args.parakeet:
            print(f"error: --model {args.model} is Parakeet-TDT: --engine-dir and --parakeet take a Canary-Qwen "
                  f"--model", file=sys.stderr)
            return 2
        engine, parakeet, factories = None, parakeet_kwargs(engine), (None, args.engine_factory)
    elif args.parakeet:
        if not is_parakeet(args.parakeet):
            print(f"error: --parakeet {args.parakeet} is not a Parakeet-TDT release (.nemo file, its folder or hub "
                  f"id)", file=sys.stderr)
            return 2
        parakeet = parakeet_kwargs(engine, args.parakeet, args.parakeet_artifacts)
    try:
        names = write_repository(args.output, engine, args.engine_dir, factories[0], instances, parakeet, factories[1])
    except (DecoderBuildError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(names)} to {args.output}; serve with: tritonserver --model-repository {args.output}")
    return 0
