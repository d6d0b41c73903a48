"""canary-trt runtime: audio input, the in-flight engine, the Python API and the command line."""

from .api import CanaryQwen
from .audio import AudioError, load_audio
from .common import Transcription
from .engine import Engine, EngineClosed, QueueFull
from .options import EngineOptions
from .parakeet import ParakeetEngine  # (sentencepiece is imported only when a model loads)

__all__ = ["CanaryQwen", "Engine", "EngineOptions", "EngineClosed", "ParakeetEngine", "QueueFull", "Transcription",
           "AudioError", "load_audio"]
