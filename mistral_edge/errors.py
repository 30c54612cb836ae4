"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class EdgeError(Exception):
    """A problem with the user's input or environment, stated in one line."""


def first_line(e: BaseException) -> str:
    """A library's error message cut to its first non-blank line (the type's name when empty), for an EdgeError."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__
