"""The encoder stage on the exact PyTorch model (the reference the compiled backends are checked against)."""

from __future__ import annotations

import torch

from ..model import Perception
from .encoder_base import BatchedEncoder


class TorchEncoder(BatchedEncoder):
    """Embeddings in the perception's dtype, on its device (a model's ``perception``)."""

    name = "torch"

    def __init__(self, perception: Perception, max_batch: int = 64):
        w = perception.proj.weight
        super().__init__(max_batch, w.device, w.dtype, perception.preprocessor.cfg, perception.encoder.cfg)
        self.perception = perception

    @torch.inference_mode()
    def _run(self, audio: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = self.device  # non_blocking: the batch is pinned on a GPU machine
        *_, emb_lens, emb = self.perception(audio.to(dev, non_blocking=True), lengths.to(dev, non_blocking=True))
        return emb, emb_lens
