"""Typed errors. The CLI maps each family to an exit code and prints one line, never a traceback."""


class GraphoptError(Exception):
    """Base class for every error graphopt raises on purpose."""


class InputError(GraphoptError):
    """The user gave us something we cannot use: a bad path, a broken model, bad calibration data (exit 2)."""


class UsageError(GraphoptError):
    """A bad option, pass name, pass parameter or recipe (exit 2)."""


class VerificationError(GraphoptError):
    """The optimized model does not meet the accuracy bound (exit 1)."""
