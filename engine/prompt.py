"""Tokenizer wrapper and the Qwen chat prompt, encoded exactly as NeMo's ``qwen`` prompt formatter does."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

DEFAULT_ASR_PROMPT = "Transcribe the following: {audio}"


class TokenizerError(ValueError):
    """The tokenizer files are missing or inconsistent with the model."""


def _token_content(value) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Qwen byte-level BPE (``tokenizers`` library) with the audio locator tag added as a special token.

    Special ids are read from the files (the test fixtures use other ids than the release on purpose).
    """

    def __init__(self, tok: HFTokenizer, audio_tag: str, eos_token: str, pad_token: str, source: str):
        self._tok = tok
        # NeMo adds the tag as an extra special token: it takes the first free id (151669 for Qwen3).
        tok.add_special_tokens([AddedToken(audio_tag, special=True, normalized=False)])
        self.audio_tag = audio_tag
        self.audio_id = self._id(audio_tag, source)
        self.eos_id = self._id(eos_token, source)
        self.pad_id = self._id(pad_token, source)
        self.im_start, self.im_end = "<|im_start|>", "<|im_end|>"
        self._id(self.im_start, source)

    def _id(self, token: str, source: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise TokenizerError(f"{source}: token {token!r} is not in the tokenizer")
        return i

    @classmethod
    def from_dir(cls, path: str | Path, audio_tag: str) -> "Tokenizer":
        path = Path(path)
        tj = path / "tokenizer.json"
        if not tj.is_file():
            raise TokenizerError(f"{path}: no tokenizer.json (expected the base LLM's tokenizer files here)")
        tok = HFTokenizer.from_file(str(tj))
        cfg = {}
        if (path / "tokenizer_config.json").is_file():
            cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        eos = _token_content(cfg.get("eos_token")) or "<|im_end|>"
        pad = _token_content(cfg.get("pad_token")) or "<|endoftext|>"
        return cls(tok, audio_tag, eos, pad, str(path))

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def prompt_ids(self, message: str = DEFAULT_ASR_PROMPT) -> list[int]:
        """Ids of one user turn plus the assistant prefix; ``{audio}`` in ``message`` marks the audio.

        No system turn, no BOS, no think block. Each turn is tokenised on its own, as NeMo does.
        """
        text = message.replace("{audio}", self.audio_tag)
        if text.count(self.audio_tag) != 1:
            raise ValueError(f"prompt must contain the audio tag exactly once: {message!r}")
        user = f"{self.im_start}user\n{text}{self.im_end}\n"
        assistant = f"{self.im_start}assistant\n"
        return self.encode(user) + self.encode(assistant)
