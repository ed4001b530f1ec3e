"""Exceptions raised to users. Each message names the problem and, where there is one, the limit."""


class PromptstashError(Exception):
    """Base class of every error promptstash raises on purpose."""


class InvalidRequestError(PromptstashError, ValueError):
    """A request that can never succeed as sent (empty prompt, bad sampling value, too long...)."""


class ContextLengthError(InvalidRequestError):
    """A prompt (plus requested output) longer than the model's context window or the KV pool."""


class ModelLoadError(PromptstashError):
    """A model that cannot be loaded."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist or holds no model files."""


class UnsupportedArchitectureError(ModelLoadError):
    """A checkpoint whose architecture has no forward implementation here."""


class CorruptModelError(ModelLoadError):
    """A model file that is truncated, has a wrong checksum or cannot be parsed."""


class UnsupportedFormatError(ModelLoadError, ValueError):
    """A weight format this model or device cannot run; the message names the supported ones."""
