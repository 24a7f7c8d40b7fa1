"""The exceptions minqwen2 raises for input a user can get wrong.

Every message names *which* file, *which* key or tensor, and *what was expected*, so a
user can fix the problem without reading the source. The CLI prints these as one line.
"""

from __future__ import annotations


class MinQwen2Error(Exception):
    """Base class: an error caused by input (files, configs, flags), not by a bug."""


class ConfigError(MinQwen2Error, ValueError):
    """``config.json`` holds a value minqwen2 does not support, or is malformed."""


class WeightsError(MinQwen2Error, ValueError):
    """A checkpoint is missing, truncated, corrupt, or does not match its config."""


class ModelNotFoundError(MinQwen2Error, FileNotFoundError):
    """A model name or path that resolves to nothing installed."""


class CacheMismatchError(MinQwen2Error, ValueError):
    """A KV cache written one way (plain RoPE keys, or Dual Chunk Attention's) read the other."""
