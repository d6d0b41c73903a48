"""ONNX -> TensorRT plans for the encoder stage (what ``build/build_encoder_engine.py`` calls), and the check
that a graph only uses what the TensorRT ONNX parser supports.

Networks are always strongly typed: the precision comes from the ONNX graph (fp32, or fp16/bf16 with fp32
islands), which is the only mode TensorRT 11 has and a flag in TensorRT 10, so one ONNX file and this one
script serve both. TensorRT is imported lazily; without it everything here but ``build_plans`` works.

Supported TensorRT: 10.14 and later 10.x (10.14 is what TensorRT-LLM 1.2.1 pins), and 11.x. 10.0 and 10.1
are refused (their parser mishandles LayerNormalization under strong typing); 10.2-10.13 build with a warning,
untested. ``check_graph`` checks operators and their tensor types against 10.15's support matrix.

TensorRT Python API used (documented for 10.x and 11.x, docs.nvidia.com/deeplearning/tensorrt, "Python API":
Builder, NetworkDefinitionCreationFlag, OnnxParser, IBuilderConfig, IOptimizationProfile, ITimingCache):
``Builder.create_network(1 << STRONGLY_TYPED)``, ``OnnxParser.parse_from_file`` (reads external data next to
the file), ``create_builder_config``, ``builder_optimization_level``, ``create_optimization_profile`` +
``set_shape``, ``create_timing_cache`` / ``set_timing_cache`` / ``serialize``, ``build_serialized_network``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from .artifacts import (ENCODER_ONNX, ENCODER_PLAN, FORMAT_VERSION, FRONTEND_ONNX, FRONTEND_PLAN, ONNX_METADATA,
                        PLAN_METADATA, ArtifactError, read_metadata, write_metadata)

log = logging.getLogger(__name__)

OPS_FILE = Path(__file__).with_name("trt_onnx_ops.txt")
# Inputs the parser needs as constants (operators.md restrictions: Reduce* axes "must be an initializer",
# Squeeze/Unsqueeze axes "must be resolvable to a constant"); index of that input per operator.
CONSTANT_INPUTS = {"Squeeze": 1, "Unsqueeze": 1, **{op: 1 for op in (
    "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin",
    "ReduceProd", "ReduceSum", "ReduceSumSquare")}}


MIN_TENSORRT = (10, 14)  # targeted minimum (tested line); below it a warning
REFUSED_TENSORRT = ((10, 0), (10, 1))  # LayerNormalization under strong typing


def check_tensorrt_version(version: str) -> str | None:
    """Raise for a TensorRT the plans cannot be built with; return a warning for one below the targeted
    minimum (None when supported)."""
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return f"unrecognised TensorRT version {version!r}"
    if major_minor < (10, 0) or major_minor in REFUSED_TENSORRT:
        raise RuntimeError(f"TensorRT {version} is not supported: use 10.14 or later (10.0/10.1 mis-parse "
                           "LayerNormalization under strong typing; 8.x/9.x have no strongly typed networks)")
    if major_minor < MIN_TENSORRT:
        return f"TensorRT {version} is older than the targeted {'.'.join(map(str, MIN_TENSORRT))}: untested"
    return None


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:  # also libnvinfer missing behind an installed bindings package
        raise RuntimeError(
            f"TensorRT is not usable here ({e}). Install it from NVIDIA's index (pip install tensorrt "
            "--extra-index-url https://pypi.nvidia.com) or use an NGC TensorRT container, on a machine with a "
            "CUDA GPU.") from e
    return trt


# The support matrix's type names, as ONNX TensorProto element types.
TYPE_NAMES = {"FP32": "FLOAT", "FP16": "FLOAT16", "BF16": "BFLOAT16", "FP8": "FLOAT8E4M3FN", "FP4": "FLOAT4E2M1",
              "INT4": "INT4", "INT8": "INT8", "INT32": "INT32", "INT64": "INT64", "UINT8": "UINT8", "BOOL": "BOOL"}
# Operators whose outputs are typed by the matrix too (they have no typed data input, or they change type).
CHECK_OUTPUTS = {"Constant", "ConstantOfShape", "Cast", "CastLike"}


@dataclass(frozen=True)
class ParserOps:
    version: str  # TensorRT version of the operator list
    opsets: tuple[int, int]  # inclusive range of ai.onnx opsets the parser documents
    ops: dict[str, frozenset[str]]  # operator -> ONNX element type names it takes ("FLOAT", "BFLOAT16", ...)


def parser_ops(path: Path = OPS_FILE) -> ParserOps:
    version, opsets, ops = "", (0, 0), {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if m := re.match(r"#\s*tensorrt-version:\s*(\S+)", line):
            version = m.group(1)
        elif m := re.match(r"#\s*opset-range:\s*(\d+)\s+(\d+)", line):
            opsets = (int(m.group(1)), int(m.group(2)))
        elif line.strip() and not line.startswith("#"):
            op, types = line.split("#")[0].split()
            ops[op] = frozenset(TYPE_NAMES[t] for t in types.split(","))
    return ParserOps(version, opsets, ops)


def _value_types(model) -> dict[str, str]:
    """{tensor name: ONNX element type name} from shape inference (values it cannot type are absent)."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception as e:  # a graph inference rejects still gets the operator checks
        log.warning("shape inference failed (%s): operator dtypes are checked where they are declared", e)
    out = {}
    for v in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        if v.type.tensor_type.elem_type:
            out[v.name] = onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)
    for t in model.graph.initializer:
        out[t.name] = onnx.TensorProto.DataType.Name(t.data_type)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    out[n.output[0]] = onnx.TensorProto.DataType.Name(a.t.data_type)
    return out


def check_graph(path: Path, allowed: ParserOps | None = None) -> list[str]:
    """What the TensorRT ONNX parser would refuse in a graph: an operator outside its list, an operator on a
    tensor type its support matrix does not list for it, another domain, a local function, an opset outside
    its range, or a non-constant input where it needs a constant."""
    import onnx

    allowed = allowed or parser_ops()
    model = onnx.load(str(path), load_external_data=False)
    problems = []
    for opset in model.opset_import:
        lo, hi = allowed.opsets
        if opset.domain in ("", "ai.onnx") and not lo <= opset.version <= hi:
            problems.append(f"opset {opset.version} is outside TensorRT {allowed.version}'s range {lo}-{hi}")
    problems += [f"local function {f.domain}::{f.name}" for f in model.functions]
    types = _value_types(model)
    constants = {t.name for t in model.graph.initializer}
    constants |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"}
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append(f"{node.name}: operator {node.domain}::{node.op_type} outside the default domain")
        elif node.op_type not in allowed.ops:
            problems.append(f"{node.name}: {node.op_type} is not supported by the TensorRT {allowed.version} parser")
        else:
            names = list(node.input) + (list(node.output) if node.op_type in CHECK_OUTPUTS else [])
            for name in names:
                dtype = types.get(name)
                if name and dtype is not None and dtype not in allowed.ops[node.op_type]:
                    problems.append(f"{node.name}: {node.op_type} on {dtype} ({name}) is not supported by the "
                                    f"TensorRT {allowed.version} parser")
        i = CONSTANT_INPUTS.get(node.op_type)
        if i is not None and len(node.input) > i and node.input[i] and node.input[i] not in constants:
            problems.append(f"{node.name}: {node.op_type} input {i} ({node.input[i]}) must be a constant")
    return problems


@dataclass(frozen=True)
class Profile:
    """One optimization profile: batch sizes and durations (seconds of the widest utterance in a batch)."""

    batch: tuple[int, int, int]  # min, opt, max
    duration: tuple[float, float, float]  # min, opt, max

    def shapes(self, onnx_meta: dict) -> dict[str, dict[str, list[list[int]]]]:
        """{graph: {input: [min_shape, opt_shape, max_shape]}} for frontend.onnx and encoder.onnx."""
        b, d = self.batch, self.duration
        if not (1 <= b[0] <= b[1] <= b[2]):
            raise ValueError(f"batch sizes must satisfy 1 <= min <= opt <= max, got {b}")
        if not (0 < d[0] <= d[1] <= d[2]):
            raise ValueError(f"durations must satisfy 0 < min <= opt <= max, got {d}")
        limits, model = onnx_meta["shapes"], onnx_meta["model"]
        if d[2] > limits["max_duration"]:
            raise ValueError(f"max duration {d[2]} s exceeds the {limits['max_duration']} s the ONNX was exported for")
        # Below the traced minimum the backend pads a batch anyway, so the profile need not go lower.
        samples = [max(int(round(s * model["sample_rate"])), limits["min_width"]) for s in d]
        frames = [n // model["hop_length"] + 1 for n in samples]  # centre-padded frames of a batch n samples wide
        return {
            "frontend": {"audio": [[bi, n] for bi, n in zip(b, samples)], "audio_lengths": [[bi] for bi in b]},
            "encoder": {"audio_features": [[bi, model["n_mels"], t] for bi, t in zip(b, frames)],
                        "feature_lengths": [[bi] for bi in b]},
        }


def _gpu() -> tuple[str, str]:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device: TensorRT plans are built on the GPU they will run on")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def _onnx_hashes(artifacts: Path, onnx_meta: dict) -> dict:
    """Hash the ONNX files again and refuse ones changed since export (the metadata would then lie)."""
    from ..checkpoint import file_sha256

    out = {}
    for key, entry in onnx_meta["files"].items():
        for part in [entry, *entry.get("external_data", [])]:
            if file_sha256(artifacts / part["file"]) != part["sha256"]:
                raise ArtifactError(f"{artifacts / part['file']} changed since it was exported "
                                    f"(sha256 differs from {ONNX_METADATA}): export again")
        out[key] = entry
    return out


def tf32_cleared(graph: str, precision: str) -> bool:
    """Whether a plan is built with TensorRT 10's TF32 flag cleared (it is on by default for float32
    matmul/conv; TensorRT 11 has no such flag). The frontend, always: TF32 rounds the DFT's inputs to 10
    mantissa bits, which moves the log-mel by about 0.13 (1.2e-5 without). A bf16/fp16 encoder, never: its
    only float32 GEMMs are the attention scores, whose inputs are upcast from bf16/fp16 and so exact in TF32,
    while clearing it runs them about 8x slower on SIMT units. An fp32 encoder, always: fp32 is asked for
    exactness."""
    return graph == "frontend" or precision == "fp32"


def fp32_plan_warning(precision: str, capability: str) -> str | None:
    """The warning for an fp32 encoder plan on a GPU with bf16 tensor cores (compute capability >= 8.0)."""
    if precision == "fp32" and int(capability.split(".")[0]) >= 8:
        return (f"building an fp32 encoder plan on an sm {capability} GPU: it runs several times slower than "
                "bf16 (full fp32, TF32 off); export with --precision bf16 (build/export_encoder.py) for TensorRT")
    return None


def build_plans(artifacts: Path, profiles: list[Profile], timing_cache: Path | None = None,
                optimization_level: int = 3, workspace_gib: float | None = None) -> dict:
    """frontend.onnx + encoder.onnx in ``artifacts`` -> frontend.plan + encoder.plan + tensorrt_metadata.json.

    ``timing_cache``: read if it exists and written back, so later builds (other profiles, the other graph)
    reuse kernel timings. Returns the metadata.
    """
    artifacts = Path(artifacts)
    onnx_meta = read_metadata(artifacts / ONNX_METADATA)
    if not profiles:
        raise ValueError("at least one optimization profile is needed")
    profile_shapes = [p.shapes(onnx_meta) for p in profiles]
    trt = import_tensorrt()
    if warning := check_tensorrt_version(trt.__version__):
        log.warning("%s", warning)
    gpu, capability = _gpu()
    onnx_files = _onnx_hashes(artifacts, onnx_meta)
    if warning := fp32_plan_warning(onnx_meta["precision"], capability):
        log.warning("%s", warning)

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = None
    for graph, onnx_name, plan_name in (("frontend", FRONTEND_ONNX, FRONTEND_PLAN),
                                        ("encoder", ENCODER_ONNX, ENCODER_PLAN)):
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(artifacts / onnx_name)):
            errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse {artifacts / onnx_name}:\n  {errors}")
        config = builder.create_builder_config()
        config.builder_optimization_level = optimization_level
        if tf32_cleared(graph, onnx_meta["precision"]) and hasattr(trt.BuilderFlag, "TF32"):
            config.clear_flag(trt.BuilderFlag.TF32)

        if workspace_gib is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        if cache is None:
            cache = config.create_timing_cache(cache_bytes)
        if not config.set_timing_cache(cache, False):  # False: do not use timings measured on another GPU
            raise RuntimeError(f"timing cache {timing_cache} comes from another GPU or TensorRT: delete it")
        for shapes in profile_shapes:
            profile = builder.create_optimization_profile()
            for name, (lo, opt, hi) in shapes[graph].items():
                profile.set_shape(name, lo, opt, hi)
            config.add_optimization_profile(profile)
        log.info("building %s (%d profile(s), optimization level %d)", plan_name, len(profiles), optimization_level)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise RuntimeError(f"TensorRT failed to build {plan_name} (see the TensorRT log above)")
        (artifacts / plan_name).write_bytes(bytes(plan))
    if timing_cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))

    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "tensorrt",
        "checkpoint": onnx_meta["checkpoint"],
        "precision": onnx_meta["precision"],
        "onnx": onnx_files,
        "plans": {"frontend": FRONTEND_PLAN, "encoder": ENCODER_PLAN},
        "tensorrt": {"version": trt.__version__, "gpu": gpu, "compute_capability": capability},
        "builder_optimization_level": optimization_level,
        "profiles": [{**asdict(p), **s} for p, s in zip(profiles, profile_shapes)],
        "shapes": onnx_meta["shapes"],
        "model": onnx_meta["model"],
    }
    write_metadata(artifacts / PLAN_METADATA, meta)
    return meta
