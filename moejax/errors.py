"""Errors shared across the package."""


class ConfigError(ValueError):
  """A setting that cannot work; the message names the key and the allowed values."""
