"""canary-trt runtime: audio input, the Python API and the command line."""

from .api import CanaryQwen, Transcription
from .audio import AudioError, load_audio

__all__ = ["CanaryQwen", "Transcription", "AudioError", "load_audio"]
