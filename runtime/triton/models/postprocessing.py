"""Triton Python-backend model ``postprocessing`` of the TensorRT-LLM ensemble: TOKENS_BATCH [batch, beams, len]
and SEQUENCE_LENGTH [batch, beams] from the tensorrt_llm backend -> TEXT [batch, beams]."""

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.triton import parameters
from runtime.triton.ensemble import detokenize, load_config


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        _, self.tokenizer = load_config(params["model"], params.get("llm") or None)

    def execute(self, requests):
        responses = []
        for request in requests:
            tokens = pb_utils.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()
            texts = [[t.encode() for t in detokenize(self.tokenizer, tokens[i], lengths[i])] for i in range(len(tokens))]
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("TEXT", np.array(texts, np.object_))]))
        return responses
