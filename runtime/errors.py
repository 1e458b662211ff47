"""The one exception type dtk raises for bad input: its message names the file and what is wrong."""


class DtkError(Exception):
    """A problem the user can fix. The CLI prints its message on one line and exits non-zero."""

    exit_code = 1


def file_error(path, problem: str) -> DtkError:
    """`DtkError("<path>: <problem>")` — the shape of every file-related message."""
    return DtkError(f"{path}: {problem}")
