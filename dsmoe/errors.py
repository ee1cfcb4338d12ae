"""User-facing errors: anything a user can cause (bad config, bad checkpoint, bad flags).

The CLI turns a :class:`DsmoeError` into one line on stderr and exit code 2; every other
exception is a bug and keeps its traceback.
"""


class DsmoeError(Exception):
    """An error the user caused and can fix; its message is shown as one line."""


class ConfigError(DsmoeError):
    """A missing, malformed or unsupported ``config.json`` / preset override."""


class CheckpointError(DsmoeError):
    """A checkpoint whose tensors do not match the config (missing, extra, wrong shape, corrupt)."""


class NonFiniteError(DsmoeError):
    """A computation produced NaN or Inf where a number is needed (exit code 1: a runtime failure)."""

    exit_code = 1


class DsmoeWarning(UserWarning):
    """Something dsmoe accepted but ignores or cannot check; the CLI shows it as one ``warning:`` line."""
