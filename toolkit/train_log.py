"""The training log: RUN/log.csv and its plot RUN/loss.png, and the progress a person watching sees.

log.csv has one row every --log-every steps and at each save, columns

    step, loss, ema_loss, lr, images_per_s, wall_s

(`loss` the mean over the steps since the previous row, `ema_loss` the exponential moving average of the
per-step loss with weight 0.02, bias-corrected as in Adam (Kingma & Ba 2015): after n steps the average
started at 0 is divided by 1 − 0.98^n, so the first rows are averages of the losses so far, `wall_s` the
training time since step 0, summed over resumed runs). On a
terminal progress is a bar; otherwise (a pipe, a file, a batch job) a plain line per row; `--no-progress`
keeps one line per save.
"""

from __future__ import annotations

import csv
import io
import sys
import time
from pathlib import Path

from dtk.runs import LOG_NAME, PLOT_NAME
from dtk.runtime.files import atomic_path, write_text

COLUMNS = ("step", "loss", "ema_loss", "lr", "images_per_s", "wall_s")
EMA_WEIGHT = 0.02


def read_log(path: Path, up_to_step: int) -> list[dict]:
    """The rows of an existing log.csv up to `up_to_step` (a resumed run continues it); [] if there is none
    or it cannot be read."""
    try:
        with open(path, newline="") as f:
            rows = [{k: float(row[k]) for k in COLUMNS} for row in csv.DictReader(f)]
    except (OSError, KeyError, ValueError, TypeError, csv.Error):
        return []
    for row in rows:
        row["step"] = int(row["step"])
    return [row for row in rows if row["step"] <= up_to_step]


class TrainingLog:
    """Collects the per-step loss, writes rows, draws progress. `out` is the run folder."""

    def __init__(self, out: Path, first_step: int, total_steps: int, every: int, batch: int, mode: str, echo):
        self.out, self.total, self.every, self.batch = Path(out), total_steps, every, batch
        self.mode = mode  # "bar", "lines" or "saves"
        self.echo = echo
        self.rows = read_log(self.out / LOG_NAME, first_step) if first_step else []
        # the average started at 0 over `_ema_steps` losses; a resumed run takes it back from its last row
        self._ema_steps = self.rows[-1]["step"] if self.rows else 0
        self.ema_loss = self.rows[-1]["ema_loss"] if self.rows else None
        self._ema_sum = self.ema_loss * _ema_correction(self._ema_steps) if self.rows else 0.0
        self.wall_before = self.rows[-1]["wall_s"] if self.rows else 0.0
        self.started = time.perf_counter()
        self.first_step = first_step
        self._window = []  # losses since the last row
        self._window_started, self._window_step = self.started, first_step
        self._plot_missing = False
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=first_step, unit="step", dynamic_ncols=True)

    @staticmethod
    def mode_for(progress: bool, is_main: bool) -> str:
        if not is_main:
            return "off"
        if not progress:
            return "saves"
        return "bar" if sys.stdout.isatty() and sys.stderr.isatty() else "lines"

    def step(self, step: int, loss: float, lr: float) -> None:
        """Record the loss of the step that just finished (the model is now at `step`)."""
        self._ema_sum = (1 - EMA_WEIGHT) * self._ema_sum + EMA_WEIGHT * loss
        self._ema_steps += 1
        self.ema_loss = self._ema_sum / _ema_correction(self._ema_steps)
        self._window.append(loss)
        self._lr = lr
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.ema_loss:.4f}", lr=f"{lr:.1e}", refresh=False)
            self.bar.update(1)
        if step % self.every == 0:
            self._add_row(step)
            if self.mode == "lines":
                self.echo(self.line(self.rows[-1]))

    def saved(self, step: int, path: Path, announce: bool = True) -> None:
        """A checkpoint was written at `step`: close the row, rewrite log.csv and loss.png, say so."""
        if self._window:
            self._add_row(step)
        self.write()
        if announce and self.rows:
            self.say(f"{self.line(self.rows[-1])}; wrote {path}")

    def say(self, text: str) -> None:
        if self.mode == "off":
            return
        (self.bar.write if self.bar is not None else self.echo)(text)

    def line(self, row: dict) -> str:
        done = row["step"] - self.first_step
        elapsed = time.perf_counter() - self.started
        left = (self.total - row["step"]) * elapsed / done if done else 0.0
        return (
            f"step {row['step']}/{self.total}: loss {row['loss']:.4f} (ema {row['ema_loss']:.4f}), "
            f"lr {row['lr']:.2e}, {row['images_per_s']:.1f} images/s, "
            f"{_clock(row['wall_s'])} elapsed, {_clock(left)} left"
        )

    def _add_row(self, step: int) -> None:
        now = time.perf_counter()
        steps = step - self._window_step
        self.rows.append(
            {
                "step": step,
                "loss": sum(self._window) / len(self._window),
                "ema_loss": self.ema_loss,
                "lr": self._lr,
                "images_per_s": steps * self.batch / max(now - self._window_started, 1e-9),
                "wall_s": self.wall_before + now - self.started,
            }
        )
        self._window, self._window_started, self._window_step = [], now, step

    def write(self) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: (row[k] if k == "step" else f"{row[k]:.6g}") for k in COLUMNS})
        write_text(self.out / LOG_NAME, text.getvalue())
        self._plot()

    def _plot(self) -> None:
        if len(self.rows) < 2 or self._plot_missing:
            return
        try:
            import matplotlib
        except ImportError:
            self._plot_missing = True
            self.say(f"note: matplotlib is not installed, so no {PLOT_NAME} (pip install 'dtk[train]')")
            return
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.rows]
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=(3, 1))
        top.plot(steps, [r["loss"] for r in self.rows], color="0.7", label="loss (mean per row)")
        top.plot(
            steps, [r["ema_loss"] for r in self.rows], color="C0", label=f"EMA of the loss ({EMA_WEIGHT})"
        )
        top.set_yscale("log")
        top.set_ylabel("diffusion loss")
        top.legend()
        top.grid(alpha=0.3)
        top.set_title(f"{self.out.name}: step {steps[-1]}")
        bottom.plot(steps, [r["lr"] for r in self.rows], color="C1")
        bottom.set_ylabel("learning rate")
        bottom.set_xlabel("step")
        bottom.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(self.out / PLOT_NAME) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _ema_correction(steps: int) -> float:
    """1 − (1 − w)^n: the weight an average started at 0 has given the n losses so far."""
    return 1 - (1 - EMA_WEIGHT) ** steps


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
