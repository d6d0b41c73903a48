"""Triton Python-backend model ``multimodal_encoders`` of the TensorRT-LLM ensemble: AUDIO_SAMPLES (16 kHz)
-> OUT_PROMPT_EMBEDDING_TABLE [T_enc, hidden] in the engine's dtype and OUT_PROMPT_VOCAB_SIZE (= T_enc), with
the encoder backend named in the parameters (torch, onnx or tensorrt; engine/backends/encoder.py). Only the
perception module is loaded: the LLM runs in the tensorrt_llm model."""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.triton import parameters
from runtime.triton.ensemble import open_audio_encoder


class TritonPythonModel:
    def initialize(self, args):
        kw = json.loads(parameters(args)["encoder"])
        self.encode = open_audio_encoder(kw["encoder"], kw["model"], kw["artifacts"], kw["device"], kw["dtype"])

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                samples = pb_utils.get_input_tensor_by_name(request, "AUDIO_SAMPLES").as_numpy()
                if len(samples) != 1:  # rows would be zero-padded to the longest: more frames than the audio has
                    raise ValueError(f"send one audio per request, not a batch of {len(samples)}")
                (table, frames), = self.encode([samples[0]])
                # DLPack: numpy has no bfloat16, and as_numpy-style tensors would need it.
                outputs = [pb_utils.Tensor.from_dlpack("OUT_PROMPT_EMBEDDING_TABLE", table[None].contiguous()),
                           pb_utils.Tensor("OUT_PROMPT_VOCAB_SIZE", np.array([[frames]], np.int32))]
                responses.append(pb_utils.InferenceResponse(outputs))
            except Exception as e:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"multimodal_encoders: {e}")))
        return responses
