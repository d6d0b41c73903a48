"""Triton Python-backend model ``multimodal_encoders`` of the TensorRT-LLM ensemble: AUDIO_SAMPLES (16 kHz)
-> OUT_PROMPT_EMBEDDING_TABLE [T_enc, hidden] and OUT_PROMPT_VOCAB_SIZE (= T_enc), with the encoder backend
named in the parameters (torch, onnx or tensorrt; engine/backends/encoder.py)."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.triton import parameters
from runtime.triton.ensemble import AudioEncoder


class TritonPythonModel:
    def initialize(self, args):
        from engine.backends.encoder import make_encoder
        from engine.checkpoint import build_model, resolve
        from runtime.common import pick_device, pick_dtype

        kw = json.loads(parameters(args)["encoder"])
        device = pick_device(kw["device"])
        files = resolve(kw["model"], kw["llm"])
        # The whole model is built because the encoder backends take it; only its perception part runs here.
        model, _ = build_model(files, dtype=pick_dtype(kw["dtype"], device), device=device)
        self.encode = AudioEncoder(make_encoder(kw["encoder"], model, files, kw["artifacts"]))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                samples = pb_utils.get_input_tensor_by_name(request, "AUDIO_SAMPLES").as_numpy()
                if len(samples) != 1:  # rows would be zero-padded to the longest: more frames than the audio has
                    raise ValueError(f"send one audio per request, not a batch of {len(samples)}")
                (table, frames), = self.encode([samples[0]])
                outputs = [pb_utils.Tensor("OUT_PROMPT_EMBEDDING_TABLE", table[None]),
                           pb_utils.Tensor("OUT_PROMPT_VOCAB_SIZE", np.array([[frames]], np.int32))]
                responses.append(pb_utils.InferenceResponse(outputs))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"multimodal_encoders: {e}")))
        return responses
