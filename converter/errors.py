"""Errors that reach the user as one line and a non-zero exit."""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 1."""
