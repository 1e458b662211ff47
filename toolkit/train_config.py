"""`TrainConfig`: a training run's settings, checked up front, stored in model.pt and restored on --resume."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.schedule import BETA_SCHEDULES, PREDICTION_TYPES, DiffusionConfig
from dtk.unet import PRESETS, UNetConfig

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
LR_SCHEDULES = ("constant", "cosine")

# Settings a resumed run may change: how long it runs, how often it writes, where and how it reports.
# Everything else (data, model, optimisation, seed, the sample grids) is the run's, restored from model.pt.
CHANGEABLE_ON_RESUME = ("steps", "save_every", "sample_every", "keep", "log_every")
# Settings of this invocation only, never taken from the checkpoint.
INVOCATION = ("out", "resume", "overwrite", "progress", "device", "threads")


@dataclass
class TrainConfig:
    """Everything `dtk train` takes; each field is the CLI flag of the same name (underscores as dashes).

    Model fields left as None take the preset's value; `image_size` None is the preset's, `channels` None the
    data's."""

    out: str = "runs/train"
    dataset: str = "digits"
    preset: str = "tiny"
    image_size: int | None = None
    channels: int | None = None
    hflip: bool = False
    # U-Net overrides
    base_channels: int | None = None
    channel_mults: tuple | None = None
    num_res_blocks: int | None = None
    attention_resolutions: tuple | None = None
    dropout: float | None = None
    num_heads: int | None = None
    num_groups: int | None = None
    # diffusion
    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    clip_sample: bool = True
    min_snr_gamma: float | None = None
    # optimisation
    steps: int = 1500
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 2e-3
    lr_schedule: str = "constant"
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"
    device: str = "auto"
    threads: int | None = None  # torch's CPU threads; None: torch's default (one per core)
    seed: int = 0
    # outputs
    sample_every: int = 500
    sample_num: int = 64
    sample_steps: int = 50
    sampler: str = "ddim"
    save_every: int = 500
    keep: int = 0
    log_every: int = 100
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    # class-conditional training; cond_dropout: share of labels dropped to the null class (for guidance)
    class_conditional: bool = False
    cond_dropout: float = 0.1

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise DtkError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for name in ("steps", "batch_size", "grad_accum", "sample_num", "sample_steps", "log_every"):
            _check(name, getattr(self, name), int, low=1)
        for name in ("warmup_steps", "sample_every", "save_every", "keep", "seed"):
            _check(name, getattr(self, name), int, low=0)
        _check("num_train_timesteps", self.num_train_timesteps, int, low=1)
        _check("lr", self.lr, float, low=0, low_open=True)
        for name in ("grad_clip", "weight_decay"):
            _check(name, getattr(self, name), float, low=0)
        _check("ema_decay", self.ema_decay, float, low=0, high=1, high_open=True)
        if self.threads is not None:
            _check("threads", self.threads, int, low=1)
        if self.dropout is not None:
            _check("dropout", self.dropout, float, low=0, high=1, high_open=True)
        _check("cond_dropout", self.cond_dropout, float, low=0, high=1, high_open=True)
        if self.min_snr_gamma is not None:
            _check("min_snr_gamma", self.min_snr_gamma, float, low=0, low_open=True)
        if self.precision not in PRECISIONS:
            raise DtkError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise DtkError(
                f"unknown lr schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}"
            )
        if self.beta_schedule not in BETA_SCHEDULES + ("squaredcos_cap_v2",):
            raise DtkError(
                f"unknown beta schedule {self.beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise DtkError(
                f"unknown prediction type {self.prediction_type!r}; choose {', '.join(PREDICTION_TYPES)}"
            )
        if self.resume and self.overwrite:
            raise DtkError("--resume continues the run in --out and --overwrite starts it over: pass one")
        if self.sample_every:  # the grids' sampler must fit the schedule: refuse now, not at the first grid
            from dtk.runtime.samplers import make_plan

            try:
                make_plan(self.sampler, self.diffusion_config(), self.sample_steps)
            except DtkError as e:
                raise DtkError(
                    f"--sample-steps {self.sample_steps} with --sampler {self.sampler}: {e}"
                ) from None

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in data.items()}

    def model_config(self, channels: int) -> UNetConfig:
        return UNetConfig.preset(
            self.preset,
            image_size=self.image_size,
            in_channels=channels,
            out_channels=channels,
            base_channels=self.base_channels,
            channel_mults=self.channel_mults,
            num_res_blocks=self.num_res_blocks,
            attention_resolutions=self.attention_resolutions,
            dropout=self.dropout,
            num_heads=self.num_heads,
            num_groups=self.num_groups,
        )

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            prediction_type=self.prediction_type,
            clip_sample=self.clip_sample,
        )


def _check(name: str, value, kind, low=None, high=None, low_open=False, high_open=False) -> None:
    """`value` is a `kind` (int, or float: any finite real) inside the given bounds, or a DtkError naming the
    flag."""
    flag = "--" + name.replace("_", "-")
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (kind is int and not isinstance(value, int)):
        raise DtkError(f"{flag} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not math.isfinite(value):
        raise DtkError(f"{flag} must be a finite number, got {value}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = (
            f"{left}{low}, {high}{right}"
            if high is not None
            else f"{'above' if low_open else 'at least'} {low}"
        )
        raise DtkError(f"{flag} must be {'in ' if high is not None else ''}{span}, got {value}")


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps` (Ho et al. 2020), then constant, or a cosine decay to zero at
    `steps` (Loshchilov & Hutter 2017, SGDR; diffusers' `get_cosine_schedule_with_warmup`)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.lr
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def given_fields(config: TrainConfig) -> set[str]:
    """The fields of `config` that differ from the defaults: what a Python caller set."""
    return {f.name for f in dataclasses.fields(TrainConfig) if getattr(config, f.name) != f.default}


def resumed_config(config: TrainConfig, stored: dict, given: set[str], path) -> TrainConfig:
    """The run's own settings (`stored`, from model.pt) with this invocation's: flags given again must match
    the run's, except those in CHANGEABLE_ON_RESUME; a conflicting flag is refused in one line."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    run = {name: stored[name] for name in fields if name in stored}
    run = {k: tuple(v) if isinstance(v, list) else v for k, v in run.items()}
    run = {**{k: f.default for k, f in fields.items()}, **run}
    conflicts = []
    for name in sorted(given & fields.keys()):
        if name in CHANGEABLE_ON_RESUME or name in INVOCATION:
            continue
        ours, theirs = getattr(config, name), run[name]
        if ours != theirs:
            conflicts.append(f"--{name.replace('_', '-')} {_show(ours)} (the run has {_show(theirs)})")
    if conflicts:
        raise file_error(
            path,
            f"cannot resume with different settings: {'; '.join(conflicts)}; "
            "leave these flags out to continue the run as it was configured",
        )
    merged = dict(run)
    merged.update({name: getattr(config, name) for name in CHANGEABLE_ON_RESUME if name in given})
    merged.update({name: getattr(config, name) for name in INVOCATION})
    return TrainConfig(**merged)


def _show(value) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "''"
    return str(value)
