"""What the three encoder backends share: length-sorted batching, padding, and the host-side length rule.

Utterances are sorted by length, longest first, and cut into batches of at most ``max_batch`` (or fewer
where the backend holds fewer rows at that width), so similar lengths share a batch; each batch is
zero-padded and carries its lengths, and the model's masks make padding invisible (a padded batch gives each
utterance what it gets alone). Each utterance's encoder frame count is a formula of its sample count
(``output_frames``), so it is computed on the host: no device sync to read lengths back.

The backends (encoder_torch, encoder_onnx, encoder_tensorrt) import this module; only the factory
(engine/backends/encoder.py) imports the backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Sequence

import numpy as np
import torch

from ..config import EncoderConfig, FrontendConfig
from ..encoder import subsampled_lengths
from ..frontend import feature_lengths


def length_batches(lengths: Sequence[int], max_batch: int,
                   rows_for: Callable[[int], int] | None = None) -> list[list[int]]:
    """Indices sorted by length (longest first, stable), cut into batches of at most ``max_batch`` rows, or
    ``rows_for(width)`` rows where that is fewer (``width``: the batch's longest length, its first)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches, i = [], 0
    while i < len(order):
        rows = max_batch if rows_for is None else min(max_batch, rows_for(lengths[order[i]]))
        if rows < 1:
            raise ValueError(f"no batch holds an utterance of {lengths[order[i]]} samples")
        batches.append(order[i : i + rows])
        i += rows
    return batches


def output_frames(frontend: FrontendConfig, encoder: EncoderConfig, samples: Sequence[int]) -> list[int]:
    """Encoder frames (= audio embedding rows) of utterances ``samples`` long: the frontend's and the
    subsampling's own length rules, on the host."""
    n = torch.tensor(list(samples), dtype=torch.int64)
    return subsampled_lengths(encoder, feature_lengths(frontend, n)).tolist()


class BatchedEncoder(ABC):
    """Shared batching; a backend implements ``_run`` on one zero-padded batch.

    Clips shorter than one hop count as zero-padded to it, as in the API: below one hop the frontend has no
    frame at all. ``min_width``: narrower batches are zero-padded to this many samples (masked, so exact),
    for graphs traced or built for a minimum length. ``max_samples``: the longest utterance the artifacts
    take (None: no limit). Embeddings come out in ``dtype`` (the LLM's) on ``device``.
    """

    name = "?"

    def __init__(self, max_batch: int, device: torch.device, dtype: torch.dtype, frontend: FrontendConfig,
                 encoder: EncoderConfig, min_width: int = 0, max_samples: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.max_batch, self.device, self.dtype = max_batch, torch.device(device), dtype
        self.frontend_cfg, self.encoder_cfg = frontend, encoder
        self.sample_rate, self.min_length = frontend.sample_rate, frontend.hop_length
        self.min_width, self.max_samples = min_width, max_samples

    def _rows_for(self, width: int) -> int:
        """Most rows a batch ``width`` samples wide may have (backends with shape limits narrow it)."""
        return self.max_batch

    def _padded_shape(self, rows: int, width: int) -> tuple[int, int]:
        """(rows, width) a batch is padded to before ``_run``; padding rows are minimum-length clips."""
        return rows, max(width, self.min_width)

    def encode(self, audio: Sequence[np.ndarray]) -> list[torch.Tensor]:
        """16 kHz mono float32 waveforms -> one [T_enc_i, llm_hidden] tensor each (``dtype``, on ``device``)."""
        lengths = [max(len(a), self.min_length) for a in audio]
        if self.max_samples is not None and lengths and max(lengths) > self.max_samples:
            i = int(np.argmax(lengths))
            sr = self.sample_rate
            raise ValueError(f"utterance {i} is {lengths[i] / sr:.2f} s long; the {self.name} encoder artifacts take "
                             f"at most {self.max_samples / sr:.2f} s (re-export with a larger --max-duration)")
        frames = output_frames(self.frontend_cfg, self.encoder_cfg, lengths) if lengths else []
        # Pinned staging on a GPU: the batch is filled once on the host and copied once, asynchronously.
        pin = self.device.type == "cuda"
        out: list[torch.Tensor | None] = [None] * len(audio)
        for idx in length_batches(lengths, self.max_batch, self._rows_for):
            rows, width = self._padded_shape(len(idx), lengths[idx[0]])
            batch = torch.zeros(rows, width, dtype=torch.float32, pin_memory=pin)
            batch_lengths = torch.full((rows,), self.min_length, dtype=torch.int64, pin_memory=pin)
            for row, i in enumerate(idx):
                batch[row, : len(audio[i])] = torch.from_numpy(np.asarray(audio[i], dtype=np.float32))
                batch_lengths[row] = lengths[i]
            emb, emb_lens = self._run(batch, batch_lengths)  # [rows, T_enc, H], [rows]
            self._check(emb, emb_lens, [frames[i] for i in idx])
            for row, i in enumerate(idx):
                e = emb[row, : frames[i]].to(self.device, self.dtype)
                # A view would keep the whole padded batch alive for as long as one request waits: copy it out.
                out[i] = e.clone() if e.untyped_storage().data_ptr() == emb.untyped_storage().data_ptr() else e
        return out  # type: ignore[return-value]

    def _check(self, emb: torch.Tensor, emb_lens: torch.Tensor, want: list[int]) -> None:
        """The backend's lengths must be the formula's. Compared in full where they are on the host; on a GPU
        only through the output's (host-known) shape, as reading them back would sync."""
        if emb.shape[1] < max(want):
            raise RuntimeError(f"{self.name} encoder gave {emb.shape[1]} frames for a batch needing {max(want)}")
        if emb_lens.device.type == "cpu" and emb_lens[: len(want)].tolist() != want:
            raise RuntimeError(f"{self.name} encoder lengths {emb_lens[: len(want)].tolist()} differ from the "
                               f"frontend/subsampling formula {want}")

    @abstractmethod
    def _run(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """audio [B, N] float32 (CPU, pinned on a GPU machine) + lengths [B] int64 -> embeddings [B, T_enc, H]
        + lengths [B]."""
