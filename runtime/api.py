"""Python API: ``CanaryQwen.from_pretrained(...).transcribe(inputs)``.

Offline batch transcription on the exact PyTorch model: inputs are sorted by length so each batch carries
little padding (results do not depend on batch composition), run as padded batches, and returned in input
order.
"""

from __future__ import annotations

import logging
import os
from typing import Callable, Sequence

import numpy as np
import torch

from engine.backends.base import EncoderBackend
from engine.checkpoint import DEFAULT_MODEL, build_model, resolve
from engine.model import CanaryQwenModel
from engine.prompt import DEFAULT_ASR_PROMPT, Tokenizer

from .audio import TARGET_RATE, AudioInput, load_audio
from .common import TRAINED_MAX_SECONDS, Transcription, pad_short, pick_device, pick_dtype
from .options import DEFAULT_MAX_NEW_TOKENS

log = logging.getLogger(__name__)

class CanaryQwen:
    def __init__(self, model: CanaryQwenModel, tokenizer: Tokenizer, encoder: EncoderBackend | None = None):
        """``encoder``: an encoder backend (ONNX Runtime, TensorRT, ...); None runs the model's own perception."""
        self.model = model
        self.tokenizer = tokenizer
        self.encoder = encoder

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
    ) -> "CanaryQwen":
        """``model``: hub id or folder of the release; ``llm``: base LLM hub id or folder (default: the one
        named in config.json, or the NeMo 3.0 files inside the model folder). ``merge_lora`` folds the
        adapter into the weights (faster, not bit-exact). ``encoder``: torch | onnx | tensorrt | auto (the
        best that the ``artifacts`` folder, written by build/export_encoder.py, allows here)."""
        dev = pick_device(device)
        files = resolve(model, llm)
        net, tok = build_model(files, dtype=pick_dtype(dtype, dev), device=dev, merge_lora=merge_lora)
        if encoder in ("auto", "torch") and artifacts is None:
            return cls(net, tok)
        from engine.backends.encoder import make_encoder

        return cls(net, tok, make_encoder(encoder, net, files, artifacts))

    @property
    def device(self) -> torch.device:
        return self.model.device

    @torch.inference_mode()
    def transcribe_samples(
        self,
        waves: Sequence[np.ndarray],
        batch_size: int = 16,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        prompt: str = DEFAULT_ASR_PROMPT,
        progress: Callable[[int], None] | None = None,
    ) -> list[Transcription]:
        """16 kHz mono float32 waveforms -> transcriptions, in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt_ids = self.tokenizer.prompt_ids(prompt)
        order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
        results: list[Transcription | None] = [None] * len(waves)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for i, res in zip(idx, self._run_batch([waves[i] for i in idx], prompt_ids, max_new_tokens)):
                results[i] = res
            if progress is not None:
                progress(len(idx))
        return results  # type: ignore[return-value]

    def _run_batch(self, waves: list[np.ndarray], prompt_ids: list[int], max_new_tokens: int) -> list[Transcription]:
        padded = [pad_short(np.asarray(w, dtype=np.float32), self.model.cfg.frontend.hop_length) for w in waves]
        if self.encoder is not None:
            audio_emb = self.encoder.encode(padded)
        else:
            lens = torch.tensor([len(w) for w in padded])
            audio = torch.zeros(len(waves), int(lens.max()), dtype=torch.float32)
            for i, w in enumerate(padded):
                audio[i, : len(w)] = torch.from_numpy(w)
            *_, emb_lens, emb = self.model.perception(audio.to(self.device), lens.to(self.device))
            audio_emb = [emb[i, : emb_lens[i]] for i in range(len(waves))]
        embeds, mask = self.model.splice([prompt_ids] * len(waves), self.tokenizer.audio_id, audio_emb)
        gens = self.model.generate(embeds, mask, max_new_tokens, self.tokenizer.eos_id, self.tokenizer.pad_id)
        out = []
        for w, gen in zip(waves, gens):
            ids = gen.token_ids[:-1] if gen.finished else gen.token_ids
            out.append(Transcription(
                text=self.tokenizer.decode(ids).strip(),
                token_ids=ids,
                duration=len(w) / TARGET_RATE,
                finish_reason="stop" if gen.finished else "length",
            ))
        return out

    def transcribe(
        self,
        inputs: AudioInput | Sequence[AudioInput],
        batch_size: int = 16,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        sample_rate: int | None = None,
        prompt: str = DEFAULT_ASR_PROMPT,
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
