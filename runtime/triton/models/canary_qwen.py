"""Triton Python-backend model ``canary_qwen``: the canary-trt runtime (in-flight batching engine) in Triton.

Decoupled: ``execute`` only queues each request in the engine and returns; the engine thread sends the
responses through the request's response sender (allowed from any thread in decoupled mode). Inputs: AUDIO (an
encoded file's bytes) or SAMPLES (float32) with SAMPLE_RATE; optional MAX_NEW_TOKENS and STREAM. With STREAM
true, each new piece of text goes out as a response with TEXT only; the last response (flagged final) always
carries the whole TEXT, TOKEN_IDS and FINISH_REASON. A request the client cancels is cancelled in the engine at
its next piece of text, which frees its KV blocks.

The engine comes from ``Engine.from_pretrained(**json(parameter "engine"))``, or from the callable named by
the parameter ``engine_factory`` ("module:function", same keywords) for custom backends. Every instance of the
instance_group is a stub process of its own with its own engine: a KIND_GPU instance builds it on the GPU
Triton gives it (``model_instance_device_id``), a KIND_CPU one on the configured device.
"""

import importlib
import json
import os
import sys
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.triton import parameters

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _optional(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


class _Request:
    """One request's link between the engine thread and Triton's response sender."""

    def __init__(self, sender, stream: bool, logger):
        self.sender, self.stream, self.logger = sender, stream, logger
        self.handle = None
        self.submitted = threading.Event()  # the engine may call back before submit() has returned the handle

    def on_delta(self, delta) -> None:
        """Engine thread. Never raises: an exception here would fail the engine's whole batch."""
        try:
            self.submitted.wait()
            if delta is None:
                return self._finish()
            if self.sender.is_cancelled():
                self.logger.log_info(f"canary_qwen: request {self.handle.id} cancelled by the client")
                self.handle.cancel()
            elif self.stream:
                text = pb_utils.Tensor("TEXT", np.array([delta.encode()], dtype=np.object_))
                self.sender.send(pb_utils.InferenceResponse(output_tensors=[text]))
        except Exception as e:
            self.logger.log_error(f"canary_qwen: sending a response failed: {e}")

    def _finish(self) -> None:
        try:
            result = self.handle.result(0)
        except Exception as e:
            return self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
        if result.finish_reason == "cancelled":
            self.logger.log_info(f"canary_qwen: request {self.handle.id} cancelled after "
                                 f"{len(result.token_ids)} tokens")
            return self.sender.send(flags=FINAL)  # nobody reads a cancelled request's answer
        outputs = [pb_utils.Tensor("TEXT", np.array([result.text.encode()], dtype=np.object_)),
                   pb_utils.Tensor("TOKEN_IDS", np.asarray(result.token_ids, np.int32)),
                   pb_utils.Tensor("FINISH_REASON", np.array([result.finish_reason.encode()], dtype=np.object_))]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL)


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        kwargs = json.loads(params["engine"])
        factory = params.get("engine_factory") or "runtime.engine:Engine.from_pretrained"
        module, _, attr = factory.partition(":")
        # Triton's Python stub does not read PYTHONPATH; a custom factory module may live there.
        for path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
            if path and path not in sys.path:
                sys.path.insert(0, path)
        make = importlib.import_module(module)
        for part in attr.split("."):
            make = getattr(make, part)
        self.instance = args.get("model_instance_name", "canary_qwen")
        if args.get("model_instance_kind") == "GPU":
            import torch

            gpu = int(args["model_instance_device_id"])
            torch.cuda.set_device(gpu)  # for libraries that use the current device (TensorRT-LLM)
            kwargs["device"] = f"cuda:{gpu}"
        self.logger = pb_utils.Logger
        self.engine = make(**kwargs)
        self.logger.log_info(f"canary_qwen: instance {self.instance} ready on {kwargs.get('device', 'auto')}")

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None  # decoupled: the responses go through the senders

    def _submit(self, request) -> None:
        sender = request.get_response_sender()
        try:
            audio, rate = _optional(request, "AUDIO"), None
            if audio is not None:
                audio = bytes(audio.reshape(-1)[0])
            else:
                audio, rate = _optional(request, "SAMPLES"), _optional(request, "SAMPLE_RATE")
                if audio is None or rate is None:
                    raise ValueError("send AUDIO (an encoded file) or SAMPLES (float32) with SAMPLE_RATE")
                rate = int(rate.reshape(-1)[0])
            max_new = _optional(request, "MAX_NEW_TOKENS")
            stream = _optional(request, "STREAM")
            link = _Request(sender, bool(stream is not None and stream.reshape(-1)[0]), self.logger)
            link.handle = self.engine.submit(audio, rate, on_delta=link.on_delta,
                                             max_new_tokens=None if max_new is None else int(max_new.reshape(-1)[0]))
            link.submitted.set()
            self.logger.log_verbose(f"canary_qwen: instance {self.instance} took request {link.handle.id}")
        except Exception as e:  # bad audio, too long, queue full, closing: this request fails alone
            error = pb_utils.TritonError(f"canary_qwen: {e}")
            sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def finalize(self):
        self.engine.close()  # finishes every accepted request first
