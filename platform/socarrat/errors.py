"""Errors a user can act on.

A `UserError` is a mistake in the input (a field, a path, a URI), never a bug of ours. Every front
door translates it: the CLI prints one line and exits 2, Serve answers 4xx, the Data job writes a
`failures.jsonl` row. This module depends on nothing.
"""


class UserError(ValueError):
    """A mistake in the caller's input; the message names the field, the value and what is allowed."""


class NotFoundError(UserError):
    """A path, key or URI that the caller named does not exist."""
