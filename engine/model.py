"""The whole Canary-Qwen network (NeMo's SALM): perception (frontend, encoder, projection) + Qwen3 + LoRA.

This is the exact reference: batched, padded, greedy. Faster runtimes (KV paging, CUDA graphs, compiled
engines) are checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import ModelConfig
from .encoder import ConformerEncoder
from .frontend import MelFrontend
from .llm import KVCache, Qwen3


class Perception(nn.Module):
    """audio [B, N] + lengths -> audio embeddings [B, T_enc, llm_hidden] + lengths."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.preprocessor = MelFrontend(cfg.frontend)
        self.encoder = ConformerEncoder(cfg.encoder)
        self.proj = nn.Linear(cfg.encoder.d_model, cfg.llm.hidden_size)

    def forward(self, audio: torch.Tensor, lengths: torch.Tensor):
        """Returns (mel, mel_lens, encoded, enc_lens, embeddings): every intermediate, for parity checks."""
        mel, mel_lens = self.preprocessor(audio, lengths)  # float32 always
        enc, enc_lens = self.encoder(mel.to(self.proj.weight.dtype), mel_lens)
        return mel, mel_lens, enc, enc_lens, self.proj(enc)


@dataclass
class Generation:
    """Greedy output of one sequence: new ids (eos included when produced) and per-step logits if asked."""

    token_ids: list[int]
    finished: bool  # True if eos was produced, False if max_new_tokens was reached
    step_logits: torch.Tensor | None = None  # [n_steps, vocab] float32


def causal_padded_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, L] bool (False = left padding) -> [B, 1, L, L] bool attention mask (True = attend).

    Causal and key-padding masked; a padded query also attends to itself so that its row is never empty
    (an all-masked row would make SDPA emit NaN, which would then leak through 0 * NaN in later layers).
    """
    b, n = mask.shape
    causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
    att = causal[None] & mask[:, None, :]  # [B, L, L]
    att = att | torch.eye(n, dtype=torch.bool, device=mask.device)[None]
    return att.unsqueeze(1)


class CanaryQwenModel(nn.Module):
    """Parameter names match the checkpoint after ``checkpoint.RENAMES``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.perception = Perception(cfg)
        self.embed_tokens = nn.Embedding(cfg.llm.vocab_size, cfg.llm.hidden_size)
        self.llm = Qwen3(cfg.llm, cfg.lora)
        if not cfg.llm.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.llm.hidden_size, cfg.llm.vocab_size, bias=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        w = self.embed_tokens.weight if self.cfg.llm.tie_word_embeddings else self.lm_head.weight
        return torch.nn.functional.linear(hidden, w)

    def splice(self, prompt_ids: list[list[int]], audio_id: int, audio: list[torch.Tensor]):
        """Replace each prompt's audio tag by that utterance's embeddings [T_i, H]; left-pad the batch.

        Returns inputs_embeds [B, L, H] (zero vectors on padding) and mask [B, L] (False on padding).
        """
        rows = []
        for ids, emb in zip(prompt_ids, audio, strict=True):
            at = [i for i, t in enumerate(ids) if t == audio_id]
            if len(at) != 1:
                raise ValueError(f"prompt must contain the audio tag id {audio_id} exactly once, got {len(at)}")
            ids_t = torch.tensor(ids, device=self.device)
            text = self.embed_tokens(ids_t)  # [n, H]
            rows.append(torch.cat([text[: at[0]], emb.to(text.dtype), text[at[0] + 1 :]]))
        n = max(r.shape[0] for r in rows)
        embeds = torch.zeros(len(rows), n, self.cfg.llm.hidden_size, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(rows), n, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            embeds[i, n - r.shape[0] :] = r
            mask[i, n - r.shape[0] :] = True
        return embeds, mask

    def forward_logits(self, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Full (teacher-forced) forward: [B, L, H] + [B, L] -> logits [B, L, vocab]."""
        position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
        return self.logits(self.llm(embeds, position_ids, causal_padded_mask(mask)))

    @torch.no_grad()
    def generate(
        self,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        max_new_tokens: int,
        eos_id: int,
        pad_id: int,
        return_logits: bool = False,
    ) -> list[Generation]:
        """Greedy decoding of a left-padded batch with a contiguous KV cache.

        Position ids come from the mask (``cumsum - 1``), so left padding does not shift RoPE positions.
        Rows that finished are fed the pad id (their outputs are ignored) until every row is done.
        """
        b, n, _ = embeds.shape
        cache = KVCache(self.cfg.llm, b, n + max_new_tokens, self.dtype, self.device)
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, L]
        hidden = self.llm(embeds, positions, causal_padded_mask(mask), cache)
        logits = self.logits(hidden[:, -1]).float()  # [B, vocab]
        key_mask = torch.cat([mask, torch.ones(b, max_new_tokens, dtype=torch.bool, device=mask.device)], 1)
        next_pos = positions[:, -1:] + 1  # [B, 1]
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        out_ids, out_logits = [], []
        for step in range(max_new_tokens):
            tok = logits.argmax(-1)  # [B]
            tok = torch.where(done, torch.full_like(tok, pad_id), tok)
            out_ids.append(tok)
            if return_logits:
                out_logits.append(logits)
            done = done | (tok == eos_id)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            x = self.embed_tokens(tok)[:, None]  # [B, 1, H]
            att = key_mask[:, None, None, : n + step + 1]  # [B, 1, 1, kv]
            cache.start = n + step
            hidden = self.llm(x, next_pos, att, cache)
            logits = self.logits(hidden[:, -1]).float()
            next_pos = next_pos + 1
        ids = torch.stack(out_ids, 1).tolist()  # [B, steps]
        stacked = torch.stack(out_logits, 1) if return_logits else None
        results = []
        for i, row in enumerate(ids):
            finished = eos_id in row
            row = row[: row.index(eos_id) + 1] if finished else row
            lg = stacked[i, : len(row)] if stacked is not None else None
            results.append(Generation(row, finished, lg))
        return results
