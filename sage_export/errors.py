"""Which exceptions are the user's to fix (bad input) and deserve one line, not a traceback."""

from __future__ import annotations

from .models import ModelLoadError


class UserError(Exception):
    """Raised by the commands for invalid arguments found before any long work."""


def _user_errors() -> tuple[type[BaseException], ...]:
    from .format.checkpoint import CheckpointError

    return (UserError, ModelLoadError, CheckpointError, FileExistsError, PermissionError, FileNotFoundError)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, _user_errors())


def user_message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
