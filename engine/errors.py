"""The one error type the engine raises for problems a user can fix (files, config, device).

Its message is meant to be shown as is: it says what was wrong and what to do. Anything else
that escapes the engine is a bug.
"""


class EngineError(Exception):
    """A user-facing engine failure with a one-line, actionable message."""
