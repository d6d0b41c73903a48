"""The real Qwen3 tokenizer (shipped gzipped in tests/fixtures) gives the release prompt ids of model.md."""

from __future__ import annotations

import gzip
import shutil

import pytest

from conftest import FIXTURES
from engine.prompt import Tokenizer

QWEN3 = FIXTURES / "qwen3-tokenizer"
RELEASE_PROMPT = [151644, 872, 198, 3167, 3114, 279, 2701, 25, 220, 151669, 151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Tokenizer:
    d = tmp_path_factory.mktemp("qwen3")
    with gzip.open(QWEN3 / "tokenizer.json.gz", "rb") as src, open(d / "tokenizer.json", "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copy(QWEN3 / "tokenizer_config.json", d / "tokenizer_config.json")
    return Tokenizer.from_dir(d, "<|audioplaceholder|>")


def test_release_prompt_ids(qwen3):
    assert qwen3.audio_id == 151669  # first free id after Qwen3's added tokens
    assert qwen3.eos_id == 151645 and qwen3.pad_id == 151643
    assert qwen3.prompt_ids() == RELEASE_PROMPT


def test_decode_skips_special_tokens(qwen3):
    ids = qwen3.encode("Hello world, 342 times.")
    assert qwen3.decode(ids + [qwen3.eos_id]) == "Hello world, 342 times."
    assert qwen3.decode([qwen3.audio_id]) == ""


def test_prompt_must_hold_one_audio_tag(qwen3):
    with pytest.raises(ValueError, match="exactly once"):
        qwen3.prompt_ids("no audio here")
    with pytest.raises(ValueError, match="exactly once"):
        qwen3.prompt_ids("{audio} and {audio}")
    custom = qwen3.prompt_ids("Transcribe in lower case: {audio}")
    assert custom.count(151669) == 1 and custom[:3] == RELEASE_PROMPT[:3] and custom[-5:] == RELEASE_PROMPT[-5:]
