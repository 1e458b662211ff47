"""`dtk train`: train a DDPM U-Net on an image folder or a built-in dataset and write model.pt."""

from __future__ import annotations

import dataclasses
import math

import click

# dtk.train imports torch: `dtk --help` does not load this module, `dtk train --help` does.
from dtk.train import PRECISIONS, TrainConfig
from dtk.train_config import LR_SCHEDULES

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def _ints(text: str | None, flag: str) -> tuple | None:
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=flag
        ) from None


class Real(click.FloatRange):
    """A finite float in a range: click's FloatRange lets nan and inf through."""

    def convert(self, value, param, ctx):
        value = super().convert(value, param, ctx)
        if not math.isfinite(value):
            self.fail(f"{value} is not a finite number.", param, ctx)
        return value


POSITIVE = click.IntRange(min=1)
COUNT = click.IntRange(min=0)


def option(name: str, help: str, aliases: tuple = (), **kwargs):
    """A flag for TrainConfig field `name`, defaulting to the dataclass default; `aliases` are the names the
    other dtk commands use for the same thing (-o, --batch)."""
    flag = "--" + name.replace("_", "-")
    kwargs.setdefault("default", _DEFAULTS[name])
    kwargs.setdefault("show_default", kwargs["default"] is not None and not kwargs.get("is_flag"))
    return click.option(*aliases, flag, name, help=help, **kwargs)


@click.command(
    name="train", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}
)
@option(
    "out",
    aliases=("-o",),
    help="Run folder: model.pt, log.csv, loss.png and the sample grids samples_<step>.png are written here.",
    type=str,
)
@option(
    "dataset",
    "A folder of PNG/JPEG images (searched recursively), or a built-in set: digits, shapes.",
    type=str,
)
@option("preset", "U-Net preset: tiny, small or ddpm-cifar10 (Ho et al. 2020, 35.7M parameters).", type=str)
@option(
    "image_size", "Image size in pixels (square) [default: the preset's, tiny 16, others 32].", type=POSITIVE
)
@option("channels", "1 (grayscale) or 3 (RGB) [default: the data's own].", type=click.IntRange(1, 3))
@option("hflip", "Randomly flip training images horizontally.", is_flag=True)
@option("base_channels", "U-Net width at full resolution [default: the preset's].", type=POSITIVE)
@option("channel_mults", "Width multiplier per level, comma-separated, e.g. 1,2,2,2 [default: the preset's].")
@option("num_res_blocks", "ResBlocks per level on the way down [default: the preset's].", type=POSITIVE)
@option(
    "attention_resolutions",
    "Feature-map sizes (pixels) with self-attention, comma-separated, e.g. 16; empty for none "
    "[default: the preset's].",
)
@option("dropout", "Dropout in the ResBlocks [default: the preset's].", type=Real(0.0, 1.0, max_open=True))
@option("num_heads", "Attention heads [default: the preset's].", type=POSITIVE)
@option(
    "num_groups", "GroupNorm groups; must divide every level's width [default: the preset's].", type=POSITIVE
)
@option("num_train_timesteps", "Diffusion steps T of the forward process.", type=POSITIVE)
@option(
    "beta_schedule",
    "Noise schedule (squaredcos_cap_v2 is diffusers' name for cosine).",
    type=click.Choice(["linear", "cosine", "squaredcos_cap_v2", "scaled_linear"]),
)
@option(
    "prediction_type", "What the U-Net predicts.", type=click.Choice(["epsilon", "v_prediction", "sample"])
)
@click.option(
    "--clip-sample/--no-clip-sample",
    "clip_sample",
    default=_DEFAULTS["clip_sample"],
    show_default=True,
    help="Samplers clip the predicted x0 to [-1, 1] (stored in the checkpoint's diffusion config).",
)
@option(
    "min_snr_gamma",
    "Weight the loss with Min-SNR-gamma (e.g. 5); off by default.",
    type=Real(0.0, min_open=True),
)
@option("steps", "Optimizer steps to train for (in total, when resuming).", type=POSITIVE)
@option("batch_size", "Images per micro-batch per process.", aliases=("--batch",), type=POSITIVE)
@option("grad_accum", "Micro-batches accumulated per optimizer step.", type=POSITIVE)
@option("lr", "Peak learning rate of AdamW.", type=Real(0.0, min_open=True))
@option(
    "lr_schedule",
    "After the warm-up: constant, or cosine (decays to 0 at --steps).",
    type=click.Choice(LR_SCHEDULES),
)
@option("warmup_steps", "Steps of linear learning-rate warm-up.", type=COUNT)
@option("weight_decay", "AdamW weight decay.", type=Real(0.0))
@option("grad_clip", "Clip the gradient norm to this value; 0 turns clipping off.", type=Real(0.0))
@option(
    "ema_decay",
    "Decay of the weights' exponential moving average (warmed up as (1+n)/(10+n)).",
    type=Real(0.0, 1.0, max_open=True),
)
@option(
    "precision",
    "auto: bf16 (or fp16) autocast on CUDA, fp32 elsewhere. bf16/fp16 need CUDA.",
    type=click.Choice(PRECISIONS),
)
@option("device", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", type=str)
@option(
    "threads",
    "CPU threads of torch [default: torch's: OMP_NUM_THREADS, else one per core]; on a busy machine 1 is "
    "often much faster.",
    type=POSITIVE,
)
@option("seed", "Seed for weights, data order, noise and sample grids.", type=COUNT)
@option(
    "sample_every",
    "Write a sample grid from the EMA weights every N steps and at the end; 0: never.",
    type=COUNT,
)
@option("sample_num", "Images in each sample grid.", type=POSITIVE)
@option("sample_steps", "Sampler steps for the sample grids.", type=POSITIVE)
@option("sampler", "Sampler for the sample grids.", type=click.Choice(["ddim", "ddpm", "dpmpp-2m"]))
@option(
    "save_every",
    "Also write model.pt every N steps (it is always written at the end); 0: only at the end.",
    type=COUNT,
)
@option("keep", "Also keep the last N checkpoints of the saves as model-<step>.pt; 0: none.", type=COUNT)
@option(
    "log_every",
    "A row of log.csv every N steps (and at each save); without a terminal also a progress line.",
    type=POSITIVE,
)
@option(
    "resume",
    "Continue the run in --out from its model.pt with its own settings (same step, optimizer, EMA, data "
    "order); only --steps, --save-every, --sample-every, --keep and --log-every may change.",
    is_flag=True,
)
@option("overwrite", "Start over in an --out that already holds a trained model.pt.", is_flag=True)
@click.option(
    "--progress/--no-progress",
    "progress",
    default=True,
    show_default=True,
    help="A progress bar on a terminal, a line every --log-every steps otherwise; off: a line per save.",
)
@option(
    "class_conditional",
    "Learn a class embedding (labels: digits 0-9, shapes by kind, or the folder's first-level subfolders).",
    is_flag=True,
)
@option(
    "cond_dropout", "Share of labels replaced by the null class, for classifier-free guidance.", type=float
)
@click.pass_context
def command(ctx, **options):
    """Train a DDPM U-Net and write OUT/model.pt (with EMA weights and the state to resume from).

    \b
    Examples:
      dtk train --preset tiny --dataset digits --image-size 16 --steps 1500 --out runs/digits
      dtk train --preset ddpm-cifar10 --dataset ./cifar_png --hflip --steps 800000 --lr 2e-4 --out runs/cifar
      dtk train --out runs/digits --steps 3000 --resume     # continue with the run's own settings
      torchrun --nproc_per_node 4 -m dtk train --dataset ./images --out runs/multi   # DDP, one GPU each
    """
    from dtk.train import train

    options["channel_mults"] = _ints(options["channel_mults"], "--channel-mults")
    options["attention_resolutions"] = _ints(options["attention_resolutions"], "--attention-resolutions")
    sources = (click.core.ParameterSource.COMMANDLINE, click.core.ParameterSource.ENVIRONMENT)
    given = {name for name in options if ctx.get_parameter_source(name) in sources}
    train(TrainConfig(**options), given=given)
