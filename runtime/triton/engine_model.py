"""The common part of the decoupled Triton Python-backend models that run a canary-trt engine (models/
canary_qwen.py: runtime.Engine; models/parakeet_tdt.py: runtime.parakeet.ParakeetEngine). Imported only inside
Triton's Python stub, which provides ``triton_python_backend_utils``.

Decoupled: ``execute`` only queues each request in the engine and returns; the engine thread sends the
responses through the request's response sender (allowed from any thread in decoupled mode). Inputs: AUDIO (an
encoded file's bytes) or SAMPLES (float32) with SAMPLE_RATE, optional STREAM, plus what a subclass reads
(``submit_kwargs``). With STREAM true, each piece of text the engine reports goes out as a response with TEXT
only; the last response (flagged final) carries the whole TEXT, TOKEN_IDS and FINISH_REASON, plus what a
subclass adds (``outputs``). A request the client cancels is cancelled in the engine at its next piece of
text, and its last response is empty.

The engine comes from the callable named by the parameter ``engine_factory`` ("module:function", default the
subclass's ``factory``) called with ``json(parameter "engine")`` as keywords. Every instance of the
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


def optional(request, name):
    """The input ``name`` as a numpy array, or None when the request does not carry it."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def text_tensor(name: str, text: str):
    """A [1] BYTES output holding ``text`` in UTF-8."""
    return pb_utils.Tensor(name, np.array([text.encode()], dtype=np.object_))


class _Request:
    """One request's link between the engine thread and Triton's response sender."""

    def __init__(self, model: "EngineModel", sender, stream: bool):
        self.model, self.sender, self.stream = model, sender, stream
        self.name, self.logger = model.name, model.logger
        self.handle = None
        self.submitted = threading.Event()  # the engine may call back before submit() has returned the handle

    def on_delta(self, delta) -> None:
        """Engine thread. Never raises: an exception here would fail the engine's whole batch."""
        try:
            self.submitted.wait()
            if delta is None:
                return self._finish()
            if self.sender.is_cancelled():
                self.logger.log_info(f"{self.name}: request {self.handle.id} cancelled by the client")
                self.handle.cancel()
            elif self.stream:
                self.sender.send(pb_utils.InferenceResponse(output_tensors=[text_tensor("TEXT", delta)]))
        except Exception as e:
            self.logger.log_error(f"{self.name}: sending a response failed: {e}")

    def _finish(self) -> None:
        try:
            result = self.handle.result(0)
        except Exception as e:
            return self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))), flags=FINAL)
        # A request may also finish before the engine saw the cancel (Parakeet-TDT reports its text once, at
        # the end): nobody reads a cancelled request's answer either way.
        if result.finish_reason == "cancelled" or self.sender.is_cancelled():
            self.logger.log_info(f"{self.name}: request {self.handle.id} cancelled after "
                                 f"{len(result.token_ids)} tokens")
            return self.sender.send(flags=FINAL)
        outputs = [text_tensor("TEXT", result.text),
                   pb_utils.Tensor("TOKEN_IDS", np.asarray(result.token_ids, np.int32)),
                   text_tensor("FINISH_REASON", result.finish_reason), *self.model.outputs(result)]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=outputs), flags=FINAL)


class EngineModel:
    """Base of ``TritonPythonModel`` in the engine models; subclasses set ``name`` and ``factory``."""

    name = "engine"
    factory = ""  # "module:attr.attr", called with the engine keywords

    def submit_kwargs(self, request) -> dict:
        """Extra keywords of ``engine.submit`` read from the request's own inputs."""
        return {}

    def outputs(self, result) -> list:
        """Extra output tensors of the final response, from the engine's Transcription."""
        return []

    def initialize(self, args):
        params = parameters(args)
        kwargs = json.loads(params["engine"])
        module, _, attr = (params.get("engine_factory") or self.factory).partition(":")
        # Triton's Python stub does not read PYTHONPATH; a custom factory module may live there.
        for path in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
            if path and path not in sys.path:
                sys.path.insert(0, path)
        make = importlib.import_module(module)
        for part in attr.split("."):
            make = getattr(make, part)
        self.instance = args.get("model_instance_name", self.name)
        if args.get("model_instance_kind") == "GPU":
            import torch

            gpu = int(args["model_instance_device_id"])
            torch.cuda.set_device(gpu)  # for libraries that use the current device (TensorRT-LLM)
            kwargs["device"] = f"cuda:{gpu}"
        self.logger = pb_utils.Logger
        self.engine = make(**kwargs)
        self.logger.log_info(f"{self.name}: instance {self.instance} ready on {kwargs.get('device', 'auto')}")

    def execute(self, requests):
        for request in requests:
            self._submit(request)
        return None  # decoupled: the responses go through the senders

    def _submit(self, request) -> None:
        sender = request.get_response_sender()
        try:
            audio, rate = optional(request, "AUDIO"), None
            if audio is not None:
                audio = bytes(audio.reshape(-1)[0])
            else:
                audio, rate = optional(request, "SAMPLES"), optional(request, "SAMPLE_RATE")
                if audio is None or rate is None:
                    raise ValueError("send AUDIO (an encoded file) or SAMPLES (float32) with SAMPLE_RATE")
                rate = int(rate.reshape(-1)[0])
            stream = optional(request, "STREAM")
            link = _Request(self, sender, bool(stream is not None and stream.reshape(-1)[0]))
            link.handle = self.engine.submit(audio, rate, on_delta=link.on_delta, **self.submit_kwargs(request))
            link.submitted.set()
            self.logger.log_verbose(f"{self.name}: instance {self.instance} took request {link.handle.id}")
        except Exception as e:  # bad audio, too long, queue full, closing: this request fails alone
            error = pb_utils.TritonError(f"{self.name}: {e}")
            sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)

    def finalize(self):
        self.engine.close()  # finishes every accepted request first
