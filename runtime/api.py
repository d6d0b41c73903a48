"""Python API: ``CanaryQwen.from_pretrained(...).transcribe(inputs)``.

A thin synchronous facade over the in-flight ``runtime.Engine``, the one production path: every input is a
request of its own, batched with the others in flight, and results come back in input order. Results do not
depend on batch composition, so they equal what each input gives alone. The padded reference generator
(``engine.model.CanaryQwenModel.generate``) is what the tests compare the engine against.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Callable, Sequence

import numpy as np
import torch

from engine.backends.base import EncoderBackend
from engine.checkpoint import DEFAULT_MODEL
from engine.model import CanaryQwenModel
from engine.prompt import Tokenizer

from .audio import TARGET_RATE, AudioInput, load_audio
from .common import TRAINED_MAX_SECONDS, Transcription
from .engine import Engine
from .options import EngineOptions

log = logging.getLogger(__name__)


class CanaryQwen:
    def __init__(self, model: CanaryQwenModel, tokenizer: Tokenizer, encoder: EncoderBackend | None = None,
                 options: EngineOptions | None = None, engine: Engine | None = None):
        """``encoder``: an encoder backend (ONNX Runtime, TensorRT, ...); None runs the model's own perception.
        ``options``: the engine's settings (default: ``EngineOptions()``). ``engine``: an engine already built
        over ``model``."""
        self.model, self.tokenizer = model, tokenizer
        if engine is None:
            if encoder is None:
                from engine.backends.encoder_torch import TorchEncoder

                encoder = TorchEncoder(model.perception, 64)
            engine = Engine(model, tokenizer, encoder, options=options or EngineOptions())
        self.engine = engine
        self.encoder = engine.encoder

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike = DEFAULT_MODEL,
        llm: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        merge_lora: bool = False,
        encoder: str = "auto",
        artifacts: str | os.PathLike | None = None,
        **options,
    ) -> "CanaryQwen":
        """``model``: hub id or folder of the release; ``llm``: base LLM hub id or folder (default: the one
        named in config.json, or the NeMo 3.0 files inside the model folder). ``merge_lora`` folds the
        adapter into the weights (faster, not bit-exact). ``encoder``: torch | onnx | tensorrt | auto (the
        best that the ``artifacts`` folder, written by build/export_encoder.py, allows here). ``options``:
        EngineOptions fields (``max_batch_size``, ``max_seq_len``, ...) and ``decoder``/``decoder_dir``."""
        engine = Engine.from_pretrained(model, llm, device=device, dtype=dtype, merge_lora=merge_lora,
                                        encoder=encoder, artifacts=artifacts, **options)
        return cls(engine.model, engine.tokenizer, engine=engine)

    @property
    def device(self) -> torch.device:
        return self.model.device

    def close(self) -> None:
        """Stop the engine's thread (it finishes what it holds); the facade is unusable afterwards."""
        self.engine.close()

    def __enter__(self) -> "CanaryQwen":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def transcribe_samples(
        self,
        waves: Sequence[np.ndarray],
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        prompt: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> list[Transcription]:
        """16 kHz mono float32 waveforms -> transcriptions, in input order. At most ``batch_size`` of them are
        in the engine at once (so one call cannot take the whole batch of a shared engine); the first failure
        is raised once every input has finished. ``max_new_tokens`` and ``prompt`` default to the engine's."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        results: list[Transcription | BaseException | None] = [None] * len(waves)
        window: deque = deque()

        def retire() -> None:
            i, h = window.popleft()
            try:
                results[i] = h.result()
            except Exception as e:
                results[i] = e
            if progress is not None:
                progress(1)

        for i, w in enumerate(waves):
            if len(window) >= batch_size:
                retire()
            try:
                h = self.engine.submit(w, sample_rate=TARGET_RATE, max_new_tokens=max_new_tokens, prompt=prompt)
            except Exception as e:
                results[i] = e
                continue
            window.append((i, h))
        while window:
            retire()
        error = next((r for r in results if isinstance(r, BaseException)), None)
        if error is not None:
            raise error
        return results  # type: ignore[return-value]

    def transcribe(
        self,
        inputs: AudioInput | Sequence[AudioInput],
        batch_size: int = 16,
        max_new_tokens: int | None = None,
        sample_rate: int | None = None,
        prompt: str | None = None,
    ) -> Transcription | list[Transcription]:
        """Paths, encoded bytes, or arrays/tensors (with ``sample_rate``): one input -> one result, a list ->
        a list. Every input is decoded first, so a bad one raises ``AudioError`` naming it before any work."""
        single = not isinstance(inputs, (list, tuple))
        items = [inputs] if single else list(inputs)
        waves = [load_audio(x, sample_rate) for x in items]
        for x, w in zip(items, waves):
            if len(w) > TRAINED_MAX_SECONDS * TARGET_RATE:
                log.warning("%s is %.1f s long; the model was trained on at most %.0f s and degrades beyond",
                            x if isinstance(x, (str, os.PathLike)) else "input", len(w) / TARGET_RATE,
                            TRAINED_MAX_SECONDS)
        results = self.transcribe_samples(waves, batch_size, max_new_tokens, prompt)
        return results[0] if single else results
