"""OpenAI's transcription API, in our terms: the checked request (``parse_form``), the error shape
(``ApiError``), and the response bodies (json, text, verbose_json with OpenAI's required segment fields,
srt/vtt, token log-probabilities). Plain functions over engines and results; the app itself is in
runtime/server.py."""

import json
from dataclasses import dataclass
from functools import lru_cache

from engine.parakeet import PARAKEET_TDT

from .longform import LongTranscription, Segment, VadSettings, avg_logprob, compression_ratio, to_srt, to_vtt

RESPONSE_FORMATS = ("json", "text", "verbose_json", "srt", "vtt")
# OpenAI's form fields (lists sent as `name[]`, objects as `name[key]`); any other field is a 400, never ignored
FIELDS = ("file", "model", "response_format", "stream", "language", "prompt", "temperature", "include",
          "timestamp_granularities", "chunking_strategy")
SERVER_VAD_KEYS = {"type", "threshold", "prefix_padding_ms", "silence_duration_ms"}


@dataclass
class TranscriptionRequest:
    """A checked ``POST /v1/audio/transcriptions`` form."""

    data: bytes
    filename: str  # names the upload in error messages
    model: str
    fmt: str = "json"
    stream: bool = False
    logprobs: bool = False  # include[]=logprobs
    granularities: frozenset = frozenset()  # timestamp_granularities[]: word, segment (none given: segment)
    chunking: VadSettings | None = None  # chunking_strategy given: always segment with these settings


class ApiError(Exception):
    """An answer in OpenAI's error shape; ``kind`` is the `code` and the errors-by-kind metric label."""

    TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 499: "client_closed_request"}

    def __init__(self, status: int, message: str, kind: str, param: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.retry_after = status, message, kind, param, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.kind}}


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet inverted: a token's characters -> its bytes. Printable Latin-1 bytes stand for
    themselves; every other byte b is shown as chr(256 + its rank among those others)."""
    shown = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in shown]
    return {**{chr(b): b for b in shown}, **{chr(256 + i): b for i, b in enumerate(others)}}


def token_logprobs(tokenizer, token_ids: list[int], logprobs: list[float]) -> list[dict]:
    """OpenAI's ``logprobs`` list: {token, logprob, bytes} per generated token. A token may hold part of a
    UTF-8 character: ``bytes`` is exact, ``token`` then shows U+FFFD for the incomplete part."""
    raw_tokenizer = getattr(tokenizer, "_tok", None)
    decoder = _byte_decoder()
    out = []
    for i, lp in zip(token_ids, logprobs):
        raw = raw_tokenizer.id_to_token(i) if raw_tokenizer is not None else None
        if raw and all(c in decoder for c in raw):
            data = bytes(decoder[c] for c in raw)
        else:  # a special or added token, or a tokenizer of another kind
            data = tokenizer.decode([i]).encode("utf-8")
        out.append({"token": data.decode("utf-8", errors="replace"), "logprob": float(lp), "bytes": list(data)})
    return out


def _segment(i: int, start: float, end: float, text: str, tokens: list[int], logprobs: list[float] | None,
             no_speech: float | None) -> dict:
    """One verbose_json segment, with every field OpenAI marks required. ``seek`` is the start in Whisper's
    units (10 ms mel frames); ``avg_logprob`` is None only when the decoder gives no log-probabilities."""
    return {"id": i, "seek": round(start * 100), "start": start, "end": end, "text": text, "tokens": tokens,
            "temperature": 0.0, "avg_logprob": None if logprobs is None else avg_logprob(logprobs),
            "compression_ratio": compression_ratio(text), "no_speech_prob": no_speech}


def format_transcription(fmt: str, text: str, duration: float, token_ids: list[int], logprobs=None,
                         no_speech: float | None = None):
    """The body of a finished transcription without timestamps (Canary-Qwen) in ``fmt``: a dict (JSON) or a
    string. verbose_json, srt and vtt have one segment spanning the whole audio. ``logprobs``: the token
    log-probabilities (verbose_json's avg_logprob); ``no_speech``: the VAD's no-speech probability."""
    if fmt == "json":
        return {"text": text, "usage": {"type": "duration", "seconds": duration}}
    if fmt == "text":
        return text + "\n"
    whole = LongTranscription(text, [Segment(0.0, duration, text, token_ids, "stop", no_speech, logprobs)], duration,
                              "none")
    if fmt == "verbose_json":
        return verbose_json(whole)
    if fmt in ("srt", "vtt"):
        return to_srt(whole) if fmt == "srt" else to_vtt(whole)
    raise ValueError(fmt)


def verbose_json(t: LongTranscription, words: list[dict] | None = None, granularities=frozenset()) -> dict:
    """OpenAI's verbose_json of ``t``: its segments when asked for with ``timestamp_granularities[]=segment`` or
    when no granularity is asked for (OpenAI's default), and ``words`` ({word, start, end}) when asked for with
    ``=word`` (only from a model with timestamps: parse_form refuses it for the others)."""
    body = {"task": "transcribe", "language": "english", "duration": t.duration, "text": t.text}
    if "segment" in granularities or "word" not in granularities:
        body["segments"] = [_segment(i, s.start, s.end, s.text, s.token_ids, s.logprobs, s.no_speech_prob)
                            for i, s in enumerate(t.segments)]
    if "word" in granularities:
        body["words"] = words
    body["usage"] = {"type": "duration", "seconds": t.duration}
    return body


def decoder_has_logprobs(engine) -> bool:
    return getattr(getattr(engine, "decoder", None), "logprobs", None) is not None


def has_timestamps(engine) -> bool:
    """Parakeet-TDT's results carry token, word and segment timestamps (``Transcription.extra``); Canary-Qwen's
    carry none."""
    return getattr(engine, "family", None) == PARAKEET_TDT


def _number(value, name: str, lo: float, hi: float) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = float("nan")
    if not lo <= x <= hi:  # (NaN fails too)
        raise ApiError(400, f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}", "invalid_" + name,
                       name)
    return x


def _chunking(value, parts: dict) -> VadSettings:
    """``chunking_strategy``: "auto", or a server_vad object (as JSON text, or as the fields
    ``chunking_strategy[key]`` that the openai client sends)."""
    param = "chunking_strategy"
    if parts:
        obj = parts
    elif value == "auto":
        return VadSettings()
    else:
        try:
            obj = json.loads(value)
        except (TypeError, ValueError):
            obj = None
        if not isinstance(obj, dict):
            raise ApiError(400, f"chunking_strategy must be 'auto' or a server_vad object, got {value!r}",
                           "invalid_chunking_strategy", param)
    if obj.get("type") != "server_vad" or set(obj) - SERVER_VAD_KEYS:
        raise ApiError(400, f"chunking_strategy must be 'auto' or {{'type': 'server_vad', 'threshold', "
                            f"'prefix_padding_ms', 'silence_duration_ms'}}, got {obj!r}", "invalid_chunking_strategy",
                       param)
    threshold = _number(obj.get("threshold", 0.5), "threshold", 0.0, 1.0)
    if threshold == 0:
        raise ApiError(400, "chunking_strategy threshold must be above 0", "invalid_threshold", param)
    pad = _number(obj.get("prefix_padding_ms", 300), "prefix_padding_ms", 0, 10_000)
    silence = _number(obj.get("silence_duration_ms", 200), "silence_duration_ms", 0, 60_000)
    return VadSettings(threshold=threshold, pad_s=pad / 1000, min_silence_s=silence / 1000)


def parse_form(form, engines: dict, default_model: str) -> TranscriptionRequest:
    """Check every field of the transcription form; an unknown, unsupported or malformed one is an ApiError
    naming it (the upload's bytes are read by the caller)."""
    from starlette.datastructures import UploadFile

    values: dict[str, list] = {}
    chunk_parts: dict = {}
    for key, value in form.multi_items():
        name = key[:-2] if key.endswith("[]") else key
        if name.startswith("chunking_strategy[") and name.endswith("]"):
            chunk_parts[name[len("chunking_strategy["):-1]] = value
            continue
        values.setdefault(name, []).append(value)
    uploads = [k for k, v in values.items() if isinstance(v[0], UploadFile)]
    if "file" not in uploads:
        misnamed = f" (got a file as {uploads[0]!r})" if uploads else ""
        raise ApiError(400, f"missing the audio upload: send it as the multipart file field 'file'{misnamed}",
                       "missing_file", "file")
    for name in values:
        if name not in FIELDS:
            raise ApiError(400, f"unrecognized request argument {name!r}", "unknown_parameter", name)

    def one(name, default=None):
        v = values.get(name)
        if v and len(v) > 1:
            raise ApiError(400, f"{name} given {len(v)} times", "invalid_" + name, name)
        return v[0] if v else default

    upload = one("file")
    if not isinstance(upload, UploadFile):
        raise ApiError(400, "missing the audio upload: send it as the multipart file field 'file'", "missing_file",
                       "file")
    model = one("model") or default_model
    if model not in engines:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {', '.join(map(repr, engines))}",
                       "model_not_found", "model")
    fmt = one("response_format") or "json"
    if fmt not in RESPONSE_FORMATS:
        raise ApiError(400, f"response_format {fmt!r} is not one of {', '.join(RESPONSE_FORMATS)}",
                       "invalid_response_format", "response_format")
    stream = str(one("stream") or "false").lower()
    if stream not in ("true", "false"):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "invalid_stream", "stream")
    language = str(one("language") or "en").lower()
    if language not in ("en", "english"):
        raise ApiError(400, f"language {language!r} is not supported: this model transcribes English",
                       "unsupported_language", "language")
    if str(one("prompt") or "").strip():
        # The LLM could take text context, but its effect on accuracy is not validated: not offered.
        raise ApiError(400, "prompt is not supported: this server does not pass text context to the model "
                            "(its effect on accuracy is not validated); leave it out", "unsupported_prompt", "prompt")
    temperature = one("temperature")
    if temperature is not None and _number(temperature, "temperature", 0.0, 1.0) > 0:
        raise ApiError(400, "temperature above 0 (sampling) is not supported: decoding is greedy; send 0 or "
                            "leave it out", "unsupported_temperature", "temperature")
    include = [str(v) for v in values.get("include", [])]
    for v in include:
        if v != "logprobs":
            raise ApiError(400, f"include {v!r} is not supported (only 'logprobs')", "invalid_include", "include")
    if include and fmt != "json":
        raise ApiError(400, "include[]=logprobs needs response_format json", "invalid_include", "include")
    engine = engines[model]
    if include and not decoder_has_logprobs(engine):
        raise ApiError(400, f"logprobs not available from this decoder: model {model!r} gives no token "
                            f"log-probabilities; leave out include[]=logprobs", "logprobs_unavailable", "include")
    granularities = [str(g) for g in values.get("timestamp_granularities", [])]
    for g in granularities:
        if g not in ("word", "segment"):
            raise ApiError(400, f"timestamp_granularities {g!r} is not one of word, segment",
                           "invalid_timestamp_granularity", "timestamp_granularities")
        if fmt != "verbose_json":
            raise ApiError(400, "timestamp_granularities needs response_format verbose_json",
                           "invalid_timestamp_granularity", "timestamp_granularities")
        if g == "word" and not has_timestamps(engine):
            raise ApiError(400, f"word timestamps are not available from model {model!r}: it has no word "
                                f"timestamps (Canary-Qwen gives no timestamps); 'segment' is supported",
                           "unsupported_timestamp_granularity", "timestamp_granularities")
    strategy = one("chunking_strategy")
    chunking = _chunking(strategy, chunk_parts) if strategy is not None or chunk_parts else None
    return TranscriptionRequest(b"", upload.filename or "upload", model, fmt, stream == "true", bool(include),
                                frozenset(granularities), chunking)
