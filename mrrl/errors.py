"""Errors that are the user's to fix: the CLI prints their message (no traceback) and exits with status 1."""


class MrrlError(Exception):
    """Base of every error whose message tells the user what to change."""


class ConfigError(MrrlError, ValueError):
    """A config value is missing or inconsistent."""


class ManifestError(MrrlError, FileNotFoundError):
    """A previous stage's output (manifest, checkpoint) is missing or incomplete."""


class MissingPathError(ConfigError, ManifestError):
    """A path given in the config names no file: a value to fix and a missing input at once."""
