"""Triton Python-backend model ``preprocessing`` of the TensorRT-LLM ensemble: AUDIO (encoded bytes) and
optional MAX_TOKENS -> the encoder's AUDIO_SAMPLES and the tensorrt_llm backend's inputs (runtime/triton/ensemble.py).
Every tensor has the batch axis first (max_batch_size > 0, as the tensorrt_llm backend needs)."""

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.triton import parameters
from runtime.triton.ensemble import Preprocessor, load_config


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.pre = Preprocessor(*load_config(params["model"], params.get("llm") or None))
        self.max_new_tokens = int(params["max_new_tokens"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                audio = pb_utils.get_input_tensor_by_name(request, "AUDIO").as_numpy()
                max_tokens = pb_utils.get_input_tensor_by_name(request, "MAX_TOKENS")
                rows = [self.pre(bytes(a)) for a in audio.reshape(len(audio), -1)[:, 0]]
                out = {name: _stack([r[name] for r in rows]) for name in rows[0]}
                n = np.full((len(rows), 1), self.max_new_tokens, np.int32)
                out["REQUEST_OUTPUT_LEN"] = n if max_tokens is None else max_tokens.as_numpy().astype(np.int32)
                responses.append(pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in out.items()]))
            except Exception as e:  # bad audio: this request fails alone
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"preprocessing: {e}")))
        return responses


def _stack(arrays):
    """Rows of different lengths -> one [batch, max_len] array, zero-padded (lengths travel separately)."""
    width = max(len(a) for a in arrays)
    out = np.zeros((len(arrays), width), arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out
