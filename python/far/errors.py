"""The errors the `far` package raises for problems a user can fix (the CLI prints them as one
`far: error:` line; anything else is a bug and keeps its traceback).

    FarError                 base of every far user error
      ConfigError            an option, argument or model name that cannot be used
      CheckpointError        a missing, truncated, corrupt or mismatching checkpoint file
      DataError              a dataset that is corrupt, empty, or does not fit the model
    BackendUnavailable       far_kernels' "this backend cannot run this call here" (re-exported;
                             far_kernels never imports far, so it is not a FarError subclass)

USER_ERRORS is the tuple to catch for "the user's fault". The concrete errors also derive from
ValueError, so code written against the standard exception keeps working."""
from __future__ import annotations

from far_kernels.dispatch import BackendUnavailable


class FarError(Exception):
    """Base of the errors a user can fix."""


class ConfigError(FarError, ValueError):
    """An option, argument, model name or training setting that cannot be used."""


class CheckpointError(FarError, ValueError):
    """A FAR checkpoint is missing, unreadable, truncated, corrupt, of an unsupported version, or does
    not match the architecture its config names."""


class DataError(FarError, ValueError):
    """A dataset is corrupt, empty, or does not fit the model it is used with."""


USER_ERRORS = (FarError, BackendUnavailable)

__all__ = ["BackendUnavailable", "CheckpointError", "ConfigError", "DataError", "FarError", "USER_ERRORS"]
