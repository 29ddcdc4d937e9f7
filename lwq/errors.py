"""Exceptions raised by lwq.

Every error says which setting to change. They are narrow so that callers
(the CLI, the flows) can catch exactly what they can report.
"""

from __future__ import annotations


class LwqError(Exception):
    """Base class of every error lwq raises on purpose."""


class ConfigError(LwqError, ValueError):
    """A setting has a value lwq cannot use; the message names the setting."""


class CorpusError(LwqError):
    """The training or calibration corpus could not be fetched or read."""


class ModelLoadError(LwqError):
    """A model directory cannot be loaded (missing weights, wrong tokenizer...)."""


class NumericalError(LwqError):
    """NaN or inf in activations or statistics; the message names the layer."""


class ChecksumError(LwqError):
    """A checkpoint file is missing, truncated or corrupted."""
