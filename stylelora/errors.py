"""Errors a user can act on. The CLI prints their message (no traceback) and exits non-zero."""


class StyleloraError(Exception):
    """Base class: the message says what went wrong, where (file, key) and how to fix it."""


class DataError(StyleloraError):
    """A training image, caption or folder cannot be used."""


class ConfigError(StyleloraError):
    """A configuration value or file is invalid."""


class ModelError(StyleloraError):
    """A base model cannot be loaded or is of an unsupported kind."""


class AdapterError(StyleloraError):
    """An adapter file is malformed, unsupported, or does not fit the base model."""


class TrainingError(StyleloraError):
    """Training cannot continue (e.g. the loss became NaN)."""


class TrainingCancelled(StyleloraError):
    """Training was stopped on request; a checkpoint was written to resume from."""


class NoSpaceError(StyleloraError, OSError):
    """The disk (or quota) is full: nothing partial was left at the path being written. Also an OSError (ENOSPC)."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()
