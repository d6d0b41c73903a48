"""The two stage interfaces every backend implements. The runtime only talks to these.

Encoder stage (torch | onnxruntime | tensorrt): audio waveforms -> audio embeddings, already projected to
the LLM's hidden size. Decoder stage (torch | TensorRT-LLM): requests made of prompt ids around one audio
span -> new tokens per running request at each step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch


class EncoderBackend(Protocol):
    """Batching happens inside: callers pass any number of utterances of any lengths."""

    name: str  # "torch" | "onnx" | "tensorrt"

    def encode(self, audio: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """16 kHz mono float32 waveforms -> one [T_enc_i, llm_hidden] tensor per utterance (model dtype,
        on the decoder's device)."""
        ...


@dataclass
class DecodeRequest:
    """One sequence for the decoder: ``pre_ids + audio + post_ids``, then greedy decoding."""

    request_id: int
    pre_ids: list[int]  # prompt ids before the audio tag
    audio: torch.Tensor  # [T_enc, llm_hidden] audio embeddings
    post_ids: list[int]  # prompt ids after the audio tag
    max_new_tokens: int
    blocks: list[int] | None = None  # KV blocks reserved by the scheduler (torch decoder); None elsewhere

    @property
    def prompt_len(self) -> int:
        return len(self.pre_ids) + self.audio.shape[0] + len(self.post_ids)


class DecoderBackend(Protocol):
    name: str  # "torch" | "trtllm"
    # {request_id: error message} of requests the backend failed on its own (TensorRT-LLM reports per-request
    # errors asynchronously); the runtime fails them alone and removes them from this dict.
    failed: dict[int, str]
    # {request_id: "stop" | "length"}: the decoder's own verdict that a request is done, set in the step that
    # delivers its last token (eos itself included in that step's tokens for "stop"). The runtime retires a
    # request only on this verdict and removes it from this dict; a request the runtime believes finished
    # without it, or that keeps producing tokens after it, is failed loudly.
    finished: dict[int, str]
    # Optional: {request_id: [log-probability of each token delivered in this step]} (natural log, computed on
    # the device in the same step); the runtime pops it with the tokens. Backends without it leave it absent.
    logprobs: dict[int, list[float]]

    def add(self, request: DecodeRequest) -> None:
        """Admit a request: it is prefilled (or queued for prefill) and decodes from the next step on."""
        ...

    def step(self) -> dict[int, list[int]]:
        """Advance the admitted requests: {request_id: new token ids since the last step} (one token per
        step for the torch decoder; TensorRT-LLM may deliver several). A request that produced eos or
        reached max_new_tokens gets no more tokens but stays allocated until ``release``."""
        ...

    def release(self, request_id: int) -> None:
        """Free the request's memory (KV cache); also cancels it if still running. Idempotent."""
        ...
