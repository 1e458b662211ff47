"""A training run's folder: what `dtk train --out RUN` writes there, checked before training starts.

    RUN/
      model.pt              the latest checkpoint (EMA and raw weights, the state to resume from)
      model-<step>.pt       the last --keep checkpoints
      log.csv, loss.png     the training log and its plot, rewritten at each save
      samples_<step>.png    EMA sample grids

Every command that takes a checkpoint takes RUN too (this module has no torch: the CLI asks it cheaply).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from dtk.runtime.errors import file_error

CHECKPOINT_NAME = "model.pt"
LOG_NAME = "log.csv"
PLOT_NAME = "loss.png"
_KEPT = re.compile(r"model-(\d+)\.pt")


def run_checkpoint(path) -> Path | None:
    """RUN/model.pt when `path` is a run folder (a folder with model.pt and no bundle manifest), else None."""
    path = Path(path)
    if path.is_dir() and (path / CHECKPOINT_NAME).is_file() and not (path / "dtk.json").exists():
        return path / CHECKPOINT_NAME
    return None


def checkpoint_or_run(path) -> Path:
    """`path` itself, or RUN/model.pt for a run folder."""
    return run_checkpoint(path) or Path(path)


def prepare_run_folder(out, resume: bool, overwrite: bool) -> Path:
    """Check `out` before any training: a folder (made if missing) that can be written, and that holds no
    trained model.pt unless resuming or starting over on purpose."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise file_error(out, "is a file, not a run folder: pass a folder for --out")
    checkpoint = out / CHECKPOINT_NAME
    if not resume and not overwrite and checkpoint.exists():
        raise file_error(
            out,
            f"the run exists ({checkpoint} is already trained); continue it with --resume, "
            "or pass --overwrite to start over",
        )
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise file_error(out, f"cannot write the run folder here: {e.strerror or e}") from None
    return out


def kept_checkpoints(out) -> list[tuple[int, Path]]:
    """(step, path) of every model-<step>.pt in the run folder, oldest first."""
    found = []
    for path in Path(out).glob("model-*.pt"):
        match = _KEPT.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def keep_checkpoint(out, step: int, keep: int) -> Path | None:
    """Link RUN/model.pt as RUN/model-<step>.pt and remove the kept ones beyond the newest `keep` (those of
    steps up to `step`; a later one left by an earlier run is not touched)."""
    if keep < 1:
        return None
    out = Path(out)
    target = out / f"model-{step}.pt"
    tmp = out / f".{target.name}.partial"
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(out / CHECKPOINT_NAME, tmp)  # model.pt is replaced by rename, so the link keeps this step's
    except OSError:
        import shutil

        shutil.copyfile(out / CHECKPOINT_NAME, tmp)
    os.replace(tmp, target)
    older = [path for s, path in kept_checkpoints(out) if s <= step]
    for path in older[: max(0, len(older) - keep)]:
        path.unlink(missing_ok=True)
    return target
