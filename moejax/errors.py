"""Errors shared across the package."""


class ConfigError(ValueError):
  """A setting that cannot work; the message names the key and the allowed values."""


class ConversionError(ValueError):
  """A checkpoint that cannot be converted: an unsupported architecture or setting (named), a
  tensor missing or of the wrong shape (named, with both shapes and the table entry), or a
  truncated/corrupt file."""
