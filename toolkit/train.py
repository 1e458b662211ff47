"""The training loop behind `dtk train`: AdamW with warm-up, EMA, mixed precision on CUDA, DDP under torchrun.

Every random draw of step s (timesteps, noise, dropout) comes from generators seeded with (seed, rank, s),
and the data order is a function of (seed, batch index) too, so `--resume` continues exactly where a run
stopped: on CPU a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dtk import distributed
from dtk.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dtk.data import BatchStream, ImageSet, load_dataset, mix_seed
from dtk.diffusion import NoiseSchedule, diffusion_loss
from dtk.ema import EMA
from dtk.labels import conditional_setup
from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.schedule import BETA_SCHEDULES, PREDICTION_TYPES, DiffusionConfig
from dtk.unet import PRESETS, UNet, UNetConfig, count_parameters

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GRID_GUIDANCE_SCALE = 2.0  # classifier-free guidance of a conditional run's sample grids
CHECKPOINT_NAME = "model.pt"


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
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    precision: str = "auto"
    device: str = "auto"
    seed: int = 0
    # outputs
    sample_every: int = 500
    sample_num: int = 64
    sample_steps: int = 50
    sampler: str = "ddim"
    save_every: int = 500
    resume: bool = False
    progress: bool = True
    # class-conditional training; cond_dropout: share of labels dropped to the null class (for guidance)
    class_conditional: bool = False
    cond_dropout: float = 0.1

    def validate(self) -> None:
        if self.preset not in PRESETS:
            raise DtkError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        for name in ("steps", "batch_size", "grad_accum", "sample_num", "sample_steps"):
            if getattr(self, name) < 1:
                raise DtkError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "save_every", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise DtkError(f"{name.replace('_', '-')} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise DtkError(f"cond-dropout must be in [0, 1), got {self.cond_dropout}")
        if self.lr <= 0:
            raise DtkError(f"lr must be positive, got {self.lr}")
        if self.precision not in PRECISIONS:
            raise DtkError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.beta_schedule not in BETA_SCHEDULES + ("squaredcos_cap_v2",):
            raise DtkError(
                f"unknown beta schedule {self.beta_schedule!r}; choose one of {', '.join(BETA_SCHEDULES)}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise DtkError(
                f"unknown prediction type {self.prediction_type!r}; choose {', '.join(PREDICTION_TYPES)}"
            )

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


def learning_rate(config: TrainConfig, step: int) -> float:
    """Linear warm-up over `warmup_steps`, then constant (Ho et al. 2020)."""
    if config.warmup_steps == 0:
        return config.lr
    return config.lr * min(1.0, (step + 1) / config.warmup_steps)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for fp32. `auto` is bf16 on CUDA GPUs that support it, fp16 on older
    ones, fp32 elsewhere; mixed precision is only offered on CUDA."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "fp32":
        return None
    if device.type != "cuda":
        raise DtkError(f"precision {precision} needs a CUDA device; training on {device.type} runs in fp32")
    return torch.bfloat16 if precision == "bf16" else torch.float16


class Trainer:
    """One run: the model, its optimizer and EMA, the data stream; `run()` trains to `config.steps`."""

    def __init__(self, config: TrainConfig, ctx: distributed.Context, device: torch.device):
        config.validate()
        self.config = config
        self.out = Path(config.out)
        self.ctx, self.device = ctx, device
        self.log = print if self.ctx.is_main else (lambda *a, **k: None)

        image_size = config.image_size or PRESETS[config.preset]["image_size"]
        config.model_config(config.channels or 3)  # fail on a bad model config before loading any data
        self.data: ImageSet = load_dataset(
            config.dataset, image_size, config.channels, progress=self.ctx.is_main
        )
        self.model_config = config.model_config(self.data.channels)
        if config.class_conditional:
            self.data, self.model_config = conditional_setup(self.data, config.dataset, self.model_config)
        self.diffusion = config.diffusion_config()
        self.schedule = NoiseSchedule(self.diffusion, self.device)

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.raw_model = UNet(self.model_config).to(self.device)
        self.ema = EMA(self.raw_model, config.ema_decay)
        self.optimizer = torch.optim.AdamW(
            self.raw_model.parameters(), lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay
        )
        self.amp_dtype = autocast_dtype(config.precision, self.device)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.step = 0
        if config.resume:
            self._resume()
        self.model = self.raw_model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.model = DistributedDataParallel(self.raw_model, device_ids=ids)
        self.stream = BatchStream(
            self.data, config.batch_size, config.seed, config.hflip, self.ctx.rank, self.ctx.world_size
        )

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def _resume(self) -> None:
        path = self.checkpoint_path
        ckpt = load_checkpoint(path)
        if ckpt.train_state is None:
            raise file_error(path, "has no training state to resume from (it was saved for inference only)")
        for what, theirs, ours in (
            ("U-Net config", ckpt.model_config, self.model_config),
            ("diffusion config", ckpt.diffusion, self.diffusion),
        ):
            if theirs != ours:
                a, b = theirs.to_dict(), ours.to_dict()
                diff = ", ".join(
                    f"{k}: {a.get(k)} in the checkpoint, {b.get(k)} now"
                    for k in {**a, **b}
                    if a.get(k) != b.get(k)
                )
                raise file_error(path, f"cannot resume: the {what} differs ({diff})")
        if ckpt.classes != self.classes:
            raise file_error(
                path, f"cannot resume: its classes are {ckpt.classes}, this run's {self.classes}"
            )
        if ckpt.step >= self.config.steps:
            raise file_error(path, f"already trained for {ckpt.step} steps; pass --steps above {ckpt.step}")
        state = ckpt.train_state
        self.raw_model.load_state_dict(ckpt.model_state)
        self.ema.load_state_dict(ckpt.ema_state, int(state["ema_updates"]))
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("grad_scaler"):
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step = ckpt.step
        if int(state.get("world_size", 1)) != self.ctx.world_size:
            self.log(f"note: resuming with {self.ctx.world_size} processes instead of {state['world_size']}")
        self.log(f"resuming {path} at step {self.step}")

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _seed_step(self, micro: int) -> torch.Generator:
        """Seed all randomness of micro-batch `micro` of this step; return the generator for t and ε."""
        key = (self.config.seed, self.ctx.rank, self.step, micro)
        torch.manual_seed(mix_seed(*key, 1))  # dropout draws from the global generator (CPU and CUDA)
        return torch.Generator(self.device).manual_seed(mix_seed(*key, 2))

    def train_step(self) -> float:
        """One optimizer step over `grad_accum` micro-batches; returns the mean loss."""
        config = self.config
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(config, self.step)
        total = 0.0
        for micro in range(config.grad_accum):
            generator = self._seed_step(micro)
            x0 = self.stream.batch(self.step * config.grad_accum + micro).to(self.device, non_blocking=True)
            t = torch.randint(
                0, self.schedule.num_train_timesteps, (x0.shape[0],), generator=generator, device=self.device
            )
            noise = torch.randn(x0.shape, generator=generator, device=self.device)
            labels = self._class_labels(self.step * config.grad_accum + micro, generator)
            last = micro == config.grad_accum - 1
            sync = self.model.no_sync() if self.ctx.distributed and not last else contextlib.nullcontext()
            with sync:
                with self._autocast():
                    loss = diffusion_loss(
                        self.model, self.schedule, x0, t, noise, config.min_snr_gamma, class_labels=labels
                    )
                scaled = loss / config.grad_accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            total += loss.item()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), config.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.raw_model)
        self.step += 1
        return total / config.grad_accum

    def _class_labels(self, batch: int, generator: torch.Generator) -> torch.Tensor | None:
        """The batch's labels, each replaced by the null class with probability cond_dropout; None when
        unconditional (and then nothing is drawn, so an unconditional run's numbers stay as they were)."""
        if not self.config.class_conditional:
            return None
        labels = self.stream.labels(batch).to(self.device)
        dropped = torch.rand(labels.shape, generator=generator, device=self.device) < self.config.cond_dropout
        return torch.where(dropped, self.model_config.num_class_embeds - 1, labels)

    def checkpoint(self, train_state: bool = True) -> Checkpoint:
        state = None
        if train_state:
            state = {
                "optimizer": self.optimizer.state_dict(),
                "grad_scaler": self.scaler.state_dict() if self.scaler is not None else None,
                "ema_updates": self.ema.num_updates,
                "world_size": self.ctx.world_size,
                "config": self.config.to_dict(),
            }
        return Checkpoint(
            model_config=self.model_config,
            diffusion=self.diffusion,
            model_state={k: v.detach().cpu().clone() for k, v in self.raw_model.state_dict().items()},
            ema_state=self.ema.state_dict(),
            step=self.step,
            train_state=state,
            path=self.checkpoint_path,
            classes=self.classes,
        )

    @property
    def classes(self) -> dict | None:
        if not self.config.class_conditional:
            return None
        names = list(self.data.class_names)
        return {"num_classes": len(names), "names": names, "null_class": len(names)}

    def save(self) -> None:
        distributed.check_in_sync(self.ctx, self.raw_model, self.device)  # every rank takes part
        if self.ctx.is_main:
            save_checkpoint(self.checkpoint_path, self.checkpoint())

    def sample_grid(self) -> Path | None:
        """A grid from the EMA weights with the configured sampler; rank 0 only."""
        if not self.ctx.is_main:
            return None
        from dtk.reference import sample_checkpoint
        from dtk.runtime.images import save_grid, to_uint8

        config = self.config
        num, grid_row = config.sample_num, None
        guidance = {}
        if self.classes is not None:  # a row per class
            grid_row = max(1, config.sample_num // self.classes["num_classes"])
            num = grid_row * self.classes["num_classes"]
            guidance = dict(labels="all", guidance_scale=GRID_GUIDANCE_SCALE)
        images = sample_checkpoint(
            self.checkpoint(train_state=False),
            num=num,
            steps=config.sample_steps,
            sampler=config.sampler,
            seed=config.seed,
            device=str(self.device),
            progress=False,
            **guidance,
        )
        return save_grid(to_uint8(images), self.out / f"samples_{self.step:06d}.png", nrow=grid_row)

    def run(self) -> Path:
        from tqdm import tqdm

        config = self.config
        size = self.model_config.image_size
        shape = f"{self.model_config.in_channels}x{size}x{size}"
        self.log(
            f"training {config.preset} U-Net ({count_parameters(self.raw_model):,} parameters, {shape}) "
            f"on {len(self.data)} images from {self.data.source}, {self.ctx.world_size} process(es) "
            f"on {self.device}, precision {self.amp_dtype or torch.float32}"
        )
        self.raw_model.train()
        bar = tqdm(
            total=config.steps,
            initial=self.step,
            unit="step",
            disable=not (config.progress and self.ctx.is_main),
            dynamic_ncols=True,
        )
        started, smoothed = time.perf_counter(), None
        first = self.step
        try:
            while self.step < config.steps:
                loss = self.train_step()
                if loss != loss:  # NaN
                    raise DtkError(f"loss became NaN at step {self.step}; lower --lr or use --precision fp32")
                smoothed = loss if smoothed is None else 0.98 * smoothed + 0.02 * loss
                bar.set_postfix(
                    loss=f"{smoothed:.4f}", lr=f"{learning_rate(config, self.step - 1):.1e}", refresh=False
                )
                bar.update(1)
                done = self.step == config.steps
                if config.save_every and self.step % config.save_every == 0 and not done:
                    self.save()
                if config.sample_every and (self.step % config.sample_every == 0 or done):
                    grid = self.sample_grid()
                    if grid is not None:
                        bar.write(f"step {self.step}: loss {smoothed:.4f}, samples in {grid}")
            self.save()
        finally:
            bar.close()
        elapsed = time.perf_counter() - started
        self.log(
            f"wrote {self.checkpoint_path} at step {self.step} ({(self.step - first) / elapsed:.1f} steps/s)"
        )
        if self.ctx.distributed:
            self.log(f"{self.ctx.world_size} ranks in sync")
        return self.checkpoint_path


def train(config: TrainConfig) -> Path:
    """Train (or resume) per `config` and return the path of the written checkpoint."""
    config.validate()
    ctx, device = distributed.setup(config.device)
    try:
        return Trainer(config, ctx, device).run()
    finally:
        distributed.teardown(ctx)
