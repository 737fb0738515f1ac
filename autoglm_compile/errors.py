"""Typed errors and the documented exit codes.

A user error (bad file, bad YAML, unknown target, op unsupported on the target) is a CompileError: the CLI prints
it as one line plus a hint, with no traceback. Anything else is a bug and shows its traceback (exit 1).
"""
from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: the traceback is printed
    USAGE = 2  # usage or input error: one line and a hint
    ACCURACY = 3  # the build does not match ONNX Runtime within the stated tolerance
    BUDGET = 4  # a budget given by the user failed (--max-latency-ms, --max-error)


class CompileError(Exception):
    """An error the user can fix. `str(err)` is one line; `hint` says what to do."""

    exit_code: ExitCode = ExitCode.USAGE

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


class InputError(CompileError):
    """Bad input: a missing or unreadable file, not ONNX, bad YAML, unknown target, bad option."""


class UnsupportedError(CompileError):
    """The model uses something the target or TVM cannot handle."""


class ToolchainError(CompileError):
    """A compiler or linker the target needs is missing here, or cannot produce code for the target."""


class TuningError(CompileError):
    """Tuning cannot be done as asked: a task missing from the tuning database under --tune-strict, or tasks to tune
    for a target that is not this machine (tuning measures candidates where it runs)."""


class AccuracyError(CompileError):
    exit_code = ExitCode.ACCURACY


class BudgetError(CompileError):
    exit_code = ExitCode.BUDGET
