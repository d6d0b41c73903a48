"""Triton Python-backend model ``canary_qwen``: the canary-trt runtime (in-flight batching engine) in Triton.

Decoupled, as every engine model (runtime/triton/engine_model.py: inputs, streaming, cancellation, instance
groups). Inputs: AUDIO (an encoded file's bytes) or SAMPLES (float32) with SAMPLE_RATE; optional
MAX_NEW_TOKENS and STREAM. With STREAM true, each new piece of text goes out as a response with TEXT only; the
last response (flagged final) always carries the whole TEXT, TOKEN_IDS and FINISH_REASON. A request the client
cancels is cancelled in the engine at its next piece of text, which frees its KV blocks.

The engine comes from ``Engine.from_pretrained(**json(parameter "engine"))``, or from the callable named by
the parameter ``engine_factory`` ("module:function", same keywords) for custom backends.
"""

from runtime.triton.engine_model import EngineModel, optional


class TritonPythonModel(EngineModel):
    name = "canary_qwen"
    factory = "runtime.engine:Engine.from_pretrained"

    def submit_kwargs(self, request) -> dict:
        max_new = optional(request, "MAX_NEW_TOKENS")
        return {"max_new_tokens": None if max_new is None else int(max_new.reshape(-1)[0])}
