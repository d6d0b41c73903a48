"""The reference path the engine is compared against: padded static batches through the perception and
``CanaryQwenModel.generate`` (contiguous KV cache, no scheduler), as the first version of the API ran them."""

from __future__ import annotations

import numpy as np
import torch

from runtime.common import Transcription, pad_short

SR = 16000


@torch.inference_mode()
def reference_transcribe(model, tok, waves, max_new_tokens: int, batch_size: int = 4) -> list[Transcription]:
    """16 kHz waveforms -> transcriptions in input order; batches of ``batch_size``, longest first."""
    prompt_ids = tok.prompt_ids()
    order = sorted(range(len(waves)), key=lambda i: -len(waves[i]))
    out: list[Transcription | None] = [None] * len(waves)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        padded = [pad_short(np.asarray(waves[i], dtype=np.float32), model.cfg.frontend.hop_length) for i in idx]
        lens = torch.tensor([len(w) for w in padded])
        audio = torch.zeros(len(idx), int(lens.max()), dtype=torch.float32)
        for row, w in enumerate(padded):
            audio[row, : len(w)] = torch.from_numpy(w)
        *_, emb_lens, emb = model.perception(audio.to(model.device), lens.to(model.device))
        audio_emb = [emb[row, : emb_lens[row]] for row in range(len(idx))]
        embeds, mask = model.splice([prompt_ids] * len(idx), tok.audio_id, audio_emb)
        gens = model.generate(embeds, mask, max_new_tokens, tok.eos_id, tok.pad_id)
        for i, gen in zip(idx, gens):
            ids = gen.token_ids[:-1] if gen.finished else gen.token_ids
            out[i] = Transcription(tok.decode(ids).strip(), ids, len(waves[i]) / SR,
                                   "stop" if gen.finished else "length")
    return out  # type: ignore[return-value]
