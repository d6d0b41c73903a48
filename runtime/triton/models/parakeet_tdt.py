"""Triton Python-backend model ``parakeet_tdt``: Parakeet-TDT (runtime.parakeet.ParakeetEngine) in Triton.

Decoupled, as every engine model (runtime/triton/engine_model.py: inputs, streaming, cancellation, instance
groups). Inputs: AUDIO (an encoded file's bytes) or SAMPLES (float32) with SAMPLE_RATE; optional STREAM. The
final response carries TEXT, TOKEN_IDS, FINISH_REASON ("stop"), and WORDS and SEGMENTS: JSON lists (one BYTES
element each) of ``{"word" | "segment", "start", "end", "start_offset", "end_offset"}``, times in seconds
from the start of the audio and offsets in encoder frames, as NeMo's ``transcribe(timestamps=True)`` gives
them. TDT decodes a whole utterance at once, so with STREAM true the text comes once, as one TEXT-only
response before the final one. For the same reason a request the client cancels is still transcribed (the
engine hears of the cancel only when the text arrives); its answer is dropped and its final response is empty.

The engine comes from ``ParakeetEngine.from_pretrained(**json(parameter "engine"))`` (model: hub id, .nemo
file or folder), or from the callable named by the parameter ``engine_factory`` ("module:function").
"""

import json

from runtime.triton.engine_model import EngineModel, text_tensor

WORD_KEYS = ("word", "start", "end", "start_offset", "end_offset")
SEGMENT_KEYS = ("segment", "start", "end", "start_offset", "end_offset")


def _json(rows: list[dict], keys: tuple) -> str:
    return json.dumps([{k: row[k] for k in keys} for row in rows], ensure_ascii=False)


class TritonPythonModel(EngineModel):
    name = "parakeet_tdt"
    factory = "runtime.parakeet:ParakeetEngine.from_pretrained"

    def outputs(self, result) -> list:
        return [text_tensor("WORDS", _json(result.extra["words"], WORD_KEYS)),
                text_tensor("SEGMENTS", _json(result.extra["segments"], SEGMENT_KEYS))]
