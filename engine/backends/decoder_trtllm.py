"""DecoderBackend on a TensorRT-LLM engine, through the Executor API (C++ in-flight batching).

Audio enters as a per-request prompt-tuning table: the audio span's input ids are the fake ids
``vocab_size + arange(T_enc)``, which the engine looks up in that request's own table [T_enc, hidden]
instead of the vocabulary (TensorRT-LLM 1.2 examples/models/core/qwen2audio/run.py builds the same ids).
With KV-cache block reuse a cached block is keyed by its token ids plus per-token "extra ids"; identical
fake ids of different audio would then share blocks, so the audio span carries an id derived from the
audio's content (0 on text tokens, as that example does).

The pure parts (ids, tables, extra ids, request and executor settings, end-of-sequence handling) are plain
functions tested on CPU; ``TrtllmDecoder`` only moves them in and out of ``tensorrt_llm.bindings.executor``
(names and signatures from TensorRT-LLM 1.2's nanobind bindings, cpp/tensorrt_llm/nanobind/executor/
request.cpp, executorConfig.cpp, executor.cpp), imported when a decoder is created. Needs
1.0 <= tensorrt_llm < 1.3 (engine/export/trtllm.py: ``trtllm_version_problem``); other versions are refused
with a message pointing to the torch decoder.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from engine.export.trtllm import (DTYPES, ENGINE_DIR, TORCH_DECODER_HINT, DecoderBuildError, check_engine,
                                  missing_pieces, read_metadata, require_trtllm)

from .base import DecodeRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineInfo:
    """What request building needs from a build's metadata (decoder_meta.json)."""

    vocab_size: int  # first fake id
    hidden_size: int
    dtype: torch.dtype  # the engine's; prompt tables are cast to it
    eos_id: int
    pad_id: int
    max_batch_size: int
    max_audio_frames: int
    max_input_len: int
    max_seq_len: int
    kv_cache_reuse: bool  # engine built with paged context FMHA, which block reuse needs

    @classmethod
    def from_meta(cls, meta: dict) -> "EngineInfo":
        s, t = meta["sizes"], meta["tokens"]
        return cls(meta["llm"]["vocab_size"], meta["llm"]["hidden_size"], DTYPES[meta["dtype"]], t["eos_id"],
                   t["pad_id"], s["max_batch_size"], s["max_audio_frames"], s["max_input_len"], s["max_seq_len"],
                   meta["features"]["kv_cache_reuse"])


def audio_key(audio: torch.Tensor) -> int:
    """Nonzero 63-bit id of the audio embeddings' content: the same audio gets the same id (sharing its
    cached blocks is then correct), different audio different ids (collisions: ~2^-63 per pair)."""
    data = audio.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return (int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1) or 1


def request_ids(pre_ids: list[int], n_audio: int, post_ids: list[int], vocab_size: int,
                key: int | None) -> tuple[list[int], list[int] | None]:
    """Input ids ``pre + (vocab_size + arange(n_audio)) + post`` and, given an audio key, the extra ids
    (the key on the audio span, 0 elsewhere); None without a key."""
    ids = list(pre_ids) + list(range(vocab_size, vocab_size + n_audio)) + list(post_ids)
    if key is None:
        return ids, None
    return ids, [0] * len(pre_ids) + [key] * n_audio + [0] * len(post_ids)


def request_kwargs(req: DecodeRequest, info: EngineInfo, kv_cache_reuse: bool, streaming: bool = True) -> dict:
    """Everything one executor Request needs, as plain values; raises ValueError if it cannot fit the engine."""
    if req.audio.dim() != 2 or req.audio.shape[1] != info.hidden_size:
        raise ValueError(f"request {req.request_id}: audio embeddings {list(req.audio.shape)}, "
                         f"expected [T_enc, {info.hidden_size}]")
    n = req.audio.shape[0]
    if not 0 < n <= info.max_audio_frames:
        raise ValueError(f"request {req.request_id}: {n} audio frames, the engine takes 1..{info.max_audio_frames}")
    if req.prompt_len > info.max_input_len or req.prompt_len + req.max_new_tokens > info.max_seq_len:
        raise ValueError(f"request {req.request_id}: {req.prompt_len} prompt + {req.max_new_tokens} new tokens "
                         f"exceed the engine's max_input_len {info.max_input_len} / max_seq_len {info.max_seq_len}")
    table = req.audio.detach().to(info.dtype).contiguous()  # [T_enc, hidden] in the engine's dtype
    # Keyed by the table the engine sees: equal tables give the same keys, whatever their source dtype.
    ids, extra = request_ids(req.pre_ids, n, req.post_ids, info.vocab_size,
                             audio_key(table) if kv_cache_reuse else None)
    return {"input_token_ids": ids, "max_tokens": req.max_new_tokens, "end_id": info.eos_id, "pad_id": info.pad_id,
            "streaming": streaming, "embedding_table": table, "input_token_extra_ids": extra}


def executor_config_kwargs(info: EngineInfo, kv_cache_reuse: bool, free_gpu_memory_fraction: float,
                           cuda_graphs: bool, cuda_graph_cache_size: int | None) -> dict:
    """Executor settings as plain values: greedy, in-flight batching, paged KV cache."""
    if kv_cache_reuse and not info.kv_cache_reuse:
        raise DecoderBuildError("kv_cache_reuse needs an engine built with paged context FMHA (not float32)")
    return {
        "max_beam_width": 1,
        "max_batch_size": info.max_batch_size,
        # KvCacheConfig's enable_block_reuse defaults to True in the bindings: always say it.
        "enable_block_reuse": kv_cache_reuse,
        # A fraction of the GPU memory free after loading the engine; the rest stays for the encoder.
        "free_gpu_memory_fraction": free_gpu_memory_fraction,
        "cuda_graph_mode": cuda_graphs,
        # One graph per generation batch size by default.
        "cuda_graph_cache_size": (info.max_batch_size if cuda_graph_cache_size is None else cuda_graph_cache_size)
        if cuda_graphs else 0,
    }


# The executor bindings this decoder uses: probed, as a version range cannot promise every name.
EXECUTOR_API = ["Executor", "ExecutorConfig", "KvCacheConfig", "SchedulerConfig", "BatchingType", "ModelType",
                "ExtendedRuntimePerfKnobConfig", "Request", "SamplingConfig", "OutputConfig", "PromptTuningConfig",
                "FinishReason"]


def finish_verdict(reason: str) -> tuple[str | None, str | None]:
    """A final result's ``FinishReason`` name -> (finish reason for ``finished``, error for ``failed``).
    END_ID ends a request as the model chose ("stop": the end id is then the last token), LENGTH at max_tokens
    ("length"); STOP_WORDS cannot happen (the runtime sets none, and its verdict would carry no end id), TIMED_OUT
    and CANCELLED were not asked for (a released request is never read), so they fail it; NOT_FINISHED on a
    final result would be a runtime bug."""
    if reason == "END_ID":
        return "stop", None
    if reason == "LENGTH":
        return "length", None
    return None, f"TensorRT-LLM ended the request with finish reason {reason}"


def stream_ordered(table: torch.Tensor) -> torch.Tensor:
    """The executor reads the prompt table on its own stream: wait until the kernels that made it (encoder,
    cast, on torch's current stream) are done, so it never reads an unfinished table."""
    if table.is_cuda:
        torch.cuda.current_stream(table.device).synchronize()
    return table


def new_tokens(tokens: list[int], ended_by_eos: bool, last: int | None, eos_id: int) -> list[int]:
    """The torch decoder reports the eos it produced; make a final TensorRT-LLM response do the same
    whether or not the runtime lists the end id among the output tokens."""
    if ended_by_eos and (tokens[-1:] or [last]) != [eos_id]:
        return tokens + [eos_id]
    return tokens


def _executor_config(tllm, kw: dict):
    knobs = tllm.ExtendedRuntimePerfKnobConfig(multi_block_mode=True)
    # The constructor takes only (multi_block_mode, enable_context_fmha_fp32_acc); the graph settings are
    # properties (executorConfig.cpp, 1.2).
    knobs.cuda_graph_mode = kw["cuda_graph_mode"]
    knobs.cuda_graph_cache_size = kw["cuda_graph_cache_size"]
    kv = tllm.KvCacheConfig(enable_block_reuse=kw["enable_block_reuse"],
                            free_gpu_memory_fraction=kw["free_gpu_memory_fraction"])
    return tllm.ExecutorConfig(max_beam_width=kw["max_beam_width"], max_batch_size=kw["max_batch_size"],
                               scheduler_config=tllm.SchedulerConfig(), kv_cache_config=kv,
                               batching_type=tllm.BatchingType.INFLIGHT, extended_runtime_perf_knob_config=knobs)


class TrtllmDecoder:
    """``add`` enqueues a request (streaming), ``step`` collects the tokens produced since the last step
    (waiting up to ``poll_ms`` for the first), ``release`` cancels a running request and forgets it."""

    name = "trtllm"

    def __init__(self, build_dir: str | Path, kv_cache_reuse: bool = False, free_gpu_memory_fraction: float = 0.8,
                 cuda_graphs: bool = True, cuda_graph_cache_size: int | None = None,
                 expected_weights_sha256: str | None = None, poll_ms: int = 20):
        build_dir = Path(build_dir)
        meta = read_metadata(build_dir)
        engine_dir = build_dir / ENGINE_DIR
        if meta.get("engine") is None or not (engine_dir / "config.json").is_file():
            raise DecoderBuildError(f"{build_dir}: no engine (built with --skip-engine or without tensorrt_llm)")
        try:
            version = importlib.metadata.version("tensorrt_llm")
        except importlib.metadata.PackageNotFoundError:
            version = None
        require_trtllm(version)  # before the import: 1.3 has no tensorrt_llm.bindings.executor
        from tensorrt_llm.bindings import executor as tllm  # needs the CUDA driver: import only here

        if missing := missing_pieces(tllm, EXECUTOR_API):
            raise DecoderBuildError(f"tensorrt_llm {version}: tensorrt_llm.bindings.executor lacks {missing}; "
                                    f"{TORCH_DECODER_HINT}")
        cc = list(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None
        check_engine(meta, json.loads((engine_dir / "config.json").read_text()), version, cc,
                     expected_weights_sha256)
        self.info = EngineInfo.from_meta(meta)
        self.kv_cache_reuse, self.poll_ms = kv_cache_reuse, poll_ms
        kw = executor_config_kwargs(self.info, kv_cache_reuse, free_gpu_memory_fraction, cuda_graphs,
                                    cuda_graph_cache_size)
        self._tllm = tllm
        self._executor = tllm.Executor(engine_dir, tllm.ModelType.DECODER_ONLY, _executor_config(tllm, kw))
        self._by_executor_id: dict[int, int] = {}  # executor id -> request id, until final or released
        self._executor_id: dict[int, int] = {}  # request id -> executor id, until released
        self._last: dict[int, int | None] = {}  # request id -> last token reported
        self.failed: dict[int, str] = {}  # request id -> error message of the runtime
        self.finished: dict[int, str] = {}  # request id -> "stop" | "length", set with its last tokens

    @property
    def active(self) -> int:
        return len(self._by_executor_id)

    def add(self, req: DecodeRequest) -> None:
        if req.request_id in self._executor_id:
            raise ValueError(f"request {req.request_id} is already admitted")
        kw = request_kwargs(req, self.info, self.kv_cache_reuse)
        t = self._tllm
        ptuning = t.PromptTuningConfig(stream_ordered(kw.pop("embedding_table")), kw.pop("input_token_extra_ids"))
        request = t.Request(**kw, sampling_config=t.SamplingConfig(beam_width=1, top_k=1),  # greedy
                            output_config=t.OutputConfig(exclude_input_from_output=True),
                            prompt_tuning_config=ptuning)
        eid = self._executor.enqueue_request(request)
        self._by_executor_id[eid], self._executor_id[req.request_id] = req.request_id, eid
        self._last[req.request_id] = None

    def step(self) -> dict[int, list[int]]:
        if not self._by_executor_id:
            return {}
        out: dict[int, list[int]] = {}
        for r in self._executor.await_responses(timeout=timedelta(milliseconds=self.poll_ms)):
            rid = self._by_executor_id.get(r.request_id)
            if rid is None:  # released (cancelled) meanwhile
                continue
            if r.has_error():
                log.error("request %d failed in TensorRT-LLM: %s", rid, r.error_msg)
                self.failed[rid] = r.error_msg
                del self._by_executor_id[r.request_id]
                continue
            res = r.result
            verdict, error = finish_verdict(res.finish_reasons[0].name) if res.is_final else (None, None)
            if error is not None:
                log.error("request %d: %s", rid, error)
                self.failed[rid] = error
                del self._by_executor_id[r.request_id]
                continue
            ended_by_eos = res.is_final and res.finish_reasons[0] == self._tllm.FinishReason.END_ID
            toks = new_tokens(list(res.output_token_ids[0]), ended_by_eos, self._last[rid], self.info.eos_id)
            if toks:
                out.setdefault(rid, []).extend(toks)
                self._last[rid] = toks[-1]
            if res.is_final:
                self.finished[rid] = verdict  # in the step that delivers the last tokens
                del self._by_executor_id[r.request_id]
        return out

    def release(self, request_id: int) -> None:
        eid = self._executor_id.pop(request_id, None)
        self._last.pop(request_id, None)
        self.finished.pop(request_id, None)
        if eid is not None and self._by_executor_id.pop(eid, None) is not None:
            self._executor.cancel_request(eid)  # still running: stop it and free its KV blocks

    def close(self) -> None:
        self._executor.shutdown()
