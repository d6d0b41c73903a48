"""Triton Inference Server integration: ``repository.write_repository`` writes a model repository whose Python
models (``models/*.py``, copied in as ``<name>/1/model.py``) run this package inside Triton's Python backend."""

from __future__ import annotations

import json


def parameters(args: dict) -> dict[str, str]:
    """The string parameters of a Python model's config.pbtxt, from the ``args`` of ``initialize``."""
    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
