"""What the Python models of the TensorRT-LLM ensemble compute, as plain classes (tested without Triton).

The layout is TensorRT-LLM's multimodal ensemble (tensorrtllm_backend all_models/multimodal): preprocessing ->
multimodal_encoders -> tensorrt_llm -> postprocessing. For audio the preprocessing knows the number of encoder
frames T_enc from the sample count alone, so it builds the whole prompt, with the audio span as the fake ids
``vocab_size + arange(T_enc)`` that the tensorrt_llm backend looks up in the request's prompt-embedding table
(the table the encoder model emits, one row per frame).
"""

from __future__ import annotations

import numpy as np
import torch

from engine.backends.decoder_trtllm import audio_key, request_ids
from engine.checkpoint import resolve
from engine.config import ModelConfig
from engine.encoder import subsampled_lengths
from engine.frontend import feature_lengths
from engine.prompt import DEFAULT_ASR_PROMPT, Tokenizer

from ..common import TRAINED_MAX_SECONDS, pad_short
from ..audio import load_audio


def load_config(model: str, llm: str | None) -> tuple[ModelConfig, Tokenizer]:
    """Config and tokenizer only: the pre/post-processing models need no weights."""
    files = resolve(model, llm)
    cfg = ModelConfig.from_files(files.model_dir / "config.json", files.llm_config)
    return cfg, Tokenizer.from_dir(files.tokenizer_dir, cfg.audio_locator_tag)


class Preprocessor:
    """Audio bytes -> 16 kHz samples for the encoder, and the decoder's input ids with the audio span as fake ids."""

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer, prompt: str = DEFAULT_ASR_PROMPT,
                 max_seconds: float = TRAINED_MAX_SECONDS):
        self.cfg, self.tokenizer, self.max_seconds = cfg, tokenizer, max_seconds
        self.prompt_ids = tokenizer.prompt_ids(prompt)
        k = self.prompt_ids.index(tokenizer.audio_id)
        self.pre, self.post = self.prompt_ids[:k], self.prompt_ids[k + 1 :]

    def audio_frames(self, num_samples: int) -> int:
        n = torch.tensor([num_samples])
        return int(subsampled_lengths(self.cfg.encoder, feature_lengths(self.cfg.frontend, n))[0])

    def __call__(self, audio: bytes | np.ndarray, sample_rate: int | None = None) -> dict[str, np.ndarray]:
        """One request -> the preprocessing model's outputs (without the batch axis)."""
        # Bounded decoding: the engine's prompt table is sized for the build's maximum audio (40 s by default).
        wave = pad_short(load_audio(audio, sample_rate, max_seconds=self.max_seconds), self.cfg.frontend.hop_length)
        frames = self.audio_frames(len(wave))
        # The extra ids key KV-cache block reuse on the audio's content (see decoder_trtllm): the samples
        # determine the embeddings, so hashing them is as good as hashing the table.
        ids, extra = request_ids(self.pre, frames, self.post, self.cfg.llm.vocab_size,
                                 audio_key(torch.from_numpy(wave)))
        return {"AUDIO_SAMPLES": wave.astype(np.float32),
                "INPUT_ID": np.asarray(ids, np.int32),
                "REQUEST_INPUT_LEN": np.asarray([len(ids)], np.int32),
                "OUT_END_ID": np.asarray([self.tokenizer.eos_id], np.int32),
                "OUT_PAD_ID": np.asarray([self.tokenizer.pad_id], np.int32),
                "OUT_PROMPT_TABLE_EXTRA_IDS": np.asarray(extra, np.uint64)}


class AudioEncoder:
    """16 kHz samples -> the prompt-embedding table [T_enc, hidden] and its row count. The table is in the
    encoder's output dtype, which must be the engine's: the tensorrt_llm backend passes it through unchanged
    and TensorRT-LLM refuses a table of another dtype. On the host (a few MB): the Python model sends it
    through DLPack, the only way its bf16 can travel."""

    def __init__(self, encoder):
        self.encoder = encoder  # an engine.backends EncoderBackend

    def __call__(self, samples: list[np.ndarray]) -> list[tuple[torch.Tensor, int]]:
        tables = self.encoder.encode([np.asarray(s, np.float32) for s in samples])
        return [(t.detach().cpu().contiguous(), int(t.shape[0])) for t in tables]


def open_audio_encoder(kind: str, model: str, artifacts: str | None, device: str | None, dtype: str) -> AudioEncoder:
    """The encoder of the multimodal_encoders model: the perception module alone (no LLM on this GPU), its
    weights loaded only for the torch backend (ONNX / TensorRT need its configs alone)."""
    from engine.backends.encoder import best_available, open_encoder
    from engine.checkpoint import resolve_model_dir
    from engine.export.onnx import load_perception, perception_skeleton

    from ..common import pick_device, pick_dtype

    dev, dt = pick_device(device), pick_dtype(dtype, pick_device(device))
    if kind in (None, "auto"):
        kind = best_available(artifacts, dev)
    model_dir = resolve_model_dir(model)
    perception = load_perception(model_dir).to(dev, dt) if kind == "torch" else perception_skeleton(model_dir)
    return AudioEncoder(open_encoder(kind, perception, model_dir / "model.safetensors", artifacts, dev, dt))


def detokenize(tokenizer: Tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    """tensorrt_llm's ``output_ids`` [beams, max_len] and ``sequence_length`` [beams] of one request -> one text
    per beam (padding cut by the length, special tokens dropped). With streaming these are the new tokens only,
    so the text is the new piece."""
    return [tokenizer.decode(tokens[b, : int(lengths[b])].tolist()) for b in range(tokens.shape[0])]

