"""The one exception type dtk raises for bad input: its message names the file and what is wrong."""

from __future__ import annotations


class DtkError(Exception):
    """A problem the user can fix. The CLI prints its message on one line and exits non-zero."""

    exit_code = 1


def file_error(path, problem: str) -> DtkError:
    """`DtkError("<path>: <problem>")` — the shape of every file-related message."""
    return DtkError(f"{path}: {problem}")


def os_error(error: OSError) -> DtkError:
    """An OSError (read-only folder, full disk, a directory where a file was expected...) as a DtkError
    naming the file: `<file>: <reason>`."""
    reason = error.strerror or str(error) or type(error).__name__
    if error.filename is None:
        return DtkError(one_line(reason))
    where = error.filename if error.filename2 is None else f"{error.filename} -> {error.filename2}"
    return file_error(where, one_line(reason[:1].lower() + reason[1:]))


def one_line(message: str) -> str:
    """A message on one line: its lines joined with ' | ', blank ones dropped."""
    return " | ".join(line.strip() for line in str(message).splitlines() if line.strip())
