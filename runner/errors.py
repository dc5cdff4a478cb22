"""One exception tree; the CLI maps each class to an exit code and a message without a traceback."""

from __future__ import annotations

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_GATE_WAITING = 3
EXIT_NO_GO = 4


class BackfillError(Exception):
    """Base of every error an operator is expected to act on."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  → {self.hint}"


class InvalidInput(BackfillError):
    """A plan, flag or environment is wrong; nothing was changed."""

    exit_code = EXIT_INVALID


class PlanError(InvalidInput):
    """The plan file cannot be loaded or fails validation."""


class ConnectionFailed(BackfillError):
    """A database could not be reached."""


class WorkFailed(BackfillError):
    """The work itself failed (a batch kept failing, a scope violation, a failed rollback)."""


class ScopeViolation(WorkFailed):
    """The apply statement changed rows or columns outside its declared scope; the batch was rolled back."""


class GateClosed(BackfillError):
    """A phase refused to start because the gate before it is not open (waiting for a decision)."""

    exit_code = EXIT_GATE_WAITING


class NoGo(BackfillError):
    """A gate's criteria failed or its decision was reject."""

    exit_code = EXIT_NO_GO
