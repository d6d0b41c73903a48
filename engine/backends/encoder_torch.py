"""The encoder stage on the exact PyTorch model (the reference the compiled backends are checked against)."""

from __future__ import annotations

import torch

from ..model import Perception
from .encoder import BatchedEncoder


class TorchEncoder(BatchedEncoder):
    """Embeddings in the perception's dtype, on its device (a model's ``perception``)."""

    name = "torch"

    def __init__(self, perception: Perception, max_batch: int = 16):
        fe, w = perception.preprocessor.cfg, perception.proj.weight
        super().__init__(max_batch, w.device, w.dtype, fe.sample_rate, min_length=fe.hop_length)
        self.perception = perception

    @torch.inference_mode()
    def _run(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *_, emb_lens, emb = self.perception(audio.to(self.device), lengths.to(self.device))
        return emb, emb_lens
