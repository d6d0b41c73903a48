"""``--encoder auto`` picks only what can run here and says why it fell back; an explicit ONNX encoder over
graphs onnxruntime cannot run here (bf16 on the CPU) is a clear error, in ``check-encoder`` too."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES

pytest.importorskip("onnxruntime", reason="the ONNX choice needs onnxruntime")

from engine.backends.encoder import best_available, open_encoder  # noqa: E402
from engine.export.artifacts import FORMAT_VERSION, ONNX_METADATA  # noqa: E402

TINY = FIXTURES / "tiny-canary-qwen"


def artifacts(tmp_path, precision: str):
    d = tmp_path / precision
    d.mkdir()
    (d / ONNX_METADATA).write_text(json.dumps({"format_version": FORMAT_VERSION, "precision": precision}))
    return d


def test_auto_skips_bf16_onnx_on_the_cpu_and_says_why(tmp_path, caplog):
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING):
        assert best_available(artifacts(tmp_path, "bf16"), cpu) == "torch"
    assert "bf16 ONNX graphs" in caplog.text and "torch encoder" in caplog.text
    assert best_available(artifacts(tmp_path, "fp32"), cpu) == "onnx"
    assert best_available(artifacts(tmp_path, "fp16"), cpu) == "onnx"
    assert best_available(None, cpu) == "torch"


def test_explicit_onnx_over_bf16_on_the_cpu_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="bf16 ONNX graphs, which onnxruntime cannot run on the CPU"):
        open_encoder("onnx", None, TINY / "model" / "model.safetensors", artifacts(tmp_path, "bf16"),
                     torch.device("cpu"), torch.float32)


def test_check_encoder_with_bf16_artifacts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "runtime.cli", "check-encoder", str(TINY / "audio" / "a1_yes.wav"),
                        "--model", str(TINY / "model"), "--llm", str(TINY / "llm"), "--device", "cpu",
                        "--artifacts", str(artifacts(tmp_path, "bf16")), "--backend", "onnx"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "bf16 ONNX graphs" in r.stderr and "Traceback" not in r.stderr, r.stderr
