"""Shared test fixtures: the NeMo golden checkpoints (tests/fixtures, plus any others in ../shared/fixtures)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import os

import pytest
import soundfile as sf
import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. Triton reads this when a kernel is
# defined, so it is set here, before any test module imports engine.kernels (.ci/run sets it too).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
SHARED_FIXTURES = HERE.parent.parent / "shared" / "fixtures"

torch.set_num_threads(2)


def golden_dirs() -> list[Path]:
    """Every golden fixture: ours, plus other ones the shared folder may hold (same format, other shapes)."""
    # Canary-Qwen goldens only (model/config.json); Parakeet-TDT's (tdt-tiny) have tests of their own.
    found = {p.parent.name: p.parent for p in sorted(FIXTURES.glob("*/golden.json"))
             if (p.parent / "model" / "config.json").is_file()}
    if SHARED_FIXTURES.is_dir():
        for p in sorted(SHARED_FIXTURES.glob("*/golden.json")):
            if (p.parent / "model" / "config.json").is_file():
                found.setdefault(p.parent.name, p.parent)
    return list(found.values())


@dataclass
class Golden:
    root: Path

    @cached_property
    def meta(self) -> dict:
        return json.loads((self.root / "golden.json").read_text())

    @cached_property
    def tensors(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.root / "golden.safetensors"))

    @property
    def stems(self) -> list[str]:
        return [a["stem"] for a in self.meta["audio_files"]]

    def audio_path(self, stem: str) -> Path:
        return self.root / "audio" / f"{stem}.wav"

    def audio(self, stem: str) -> torch.Tensor:
        data, sr = sf.read(str(self.audio_path(stem)), dtype="float32")
        assert sr == 16000
        return torch.from_numpy(data)

    @property
    def max_new_tokens(self) -> int:
        return int(self.meta["generation"]["max_new_tokens"])

    def load(self, **kw):
        from engine.checkpoint import build_model, resolve

        return build_model(resolve(self.root / "model", self.root / "llm"), **kw)


@pytest.fixture(scope="session", params=golden_dirs(), ids=lambda p: p.name)
def golden(request) -> Golden:
    return Golden(request.param)


_models: dict = {}


@pytest.fixture(scope="session")
def fp32_model(golden):
    key = (golden.root, "fp32")
    if key not in _models:
        _models[key] = golden.load()
    return _models[key]


def pad_batch(waves: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([len(w) for w in waves])
    x = torch.zeros(len(waves), int(lens.max()))
    for i, w in enumerate(waves):
        x[i, : len(w)] = w
    return x, lens


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: scale-free, and sensitive to any single wrong element."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
