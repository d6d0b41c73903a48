"""GPU numerics switches in one place: TF32 off for fp32 runs, and an explicit SDPA backend choice.

``configure(device, dtype)`` is called by every ``Engine`` when it is built; it logs and returns what it chose.
The switches are process-wide: once an fp32 engine has turned TF32 off, a bf16 engine in the same process
computes without TF32 too (its bf16 GEMMs are unaffected; only fp32 matmuls and convolutions are). ``sdpa_backends(dtype)`` is the backend list the decoder's prefill runs under; the encoder's
attention is written with explicit matmuls (engine/encoder.py) and never goes through SDPA.

Why: ``torch.backends.cudnn.allow_tf32`` defaults to True, so an fp32 run on a GPU would do the encoder's
convolutions in TF32 and not reliably reproduce NeMo's ids. And on sm90 torch prefers cuDNN attention, which
builds a plan (~0.3 s) for every new shape; flash / memory-efficient attention need none.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def sdpa_backends(dtype: torch.dtype) -> list:
    """SDPA backends for prefill on CUDA, in priority order: fp32 uses the math kernel only (plain fp32
    matmuls, no TF32 with ``configure``), half precision flash then memory-efficient (no cuDNN: no per-shape
    plan building), math as the last resort."""
    from torch.nn.attention import SDPBackend

    if dtype == torch.float32:
        return [SDPBackend.MATH]
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def configure(device: torch.device | str, dtype: torch.dtype) -> dict:
    """Set the process-wide switches for a model in ``dtype`` on ``device``; returns a description of the
    choice (recorded by benchmarks/gpu_check.py). No-op on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return {"device": str(device), "dtype": str(dtype).replace("torch.", ""), "tf32": False,
                "prefill_sdpa": "torch default (CPU)", "encoder_attention": "explicit matmuls (no SDPA)"}
    if dtype == torch.float32:  # exactness: IEEE fp32 convolutions and matmuls
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
    backends = sdpa_backends(dtype)
    torch.backends.cuda.enable_cudnn_sdp(False)  # also for any SDPA call outside the prefill context
    choice = {"device": torch.cuda.get_device_name(device), "dtype": str(dtype).replace("torch.", ""),
              "tf32": bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32),
              "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
              "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
              "prefill_sdpa": [b.name for b in backends], "cudnn_sdp": False,
              "encoder_attention": "explicit matmuls (no SDPA)"}
    log.info("CUDA numerics: %s", choice)
    return choice
