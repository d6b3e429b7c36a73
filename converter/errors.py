"""Errors that reach the user as one line and a non-zero exit."""


class UserError(Exception):
    """A problem with the user's input: printed as one line, exit code 1."""


def first_sentence(exc: BaseException, limit: int = 100) -> str:
    """The gist of an exception from a library, short enough to quote inside one error line."""
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    text = text.split(". ")[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(text: str, limit: int) -> str:
    """``text`` with every run of whitespace (newlines too) made one space, cut at ``limit``."""
    return " ".join(text.split())[:limit]
