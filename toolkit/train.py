"""The training loop behind `dtk train`: AdamW with warm-up, EMA, mixed precision on CUDA, DDP under torchrun.

Every random draw of step s (timesteps, noise, dropout) comes from generators seeded with (seed, rank, s),
and the data order is a function of (seed, batch index) too, so `--resume` continues exactly where a run
stopped: on CPU a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path

import torch

from dtk import distributed
from dtk.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from dtk.data import BatchStream, ImageSet, dataset_reference, load_dataset, mix_seed
from dtk.diffusion import NoiseSchedule, diffusion_loss
from dtk.ema import EMA
from dtk.labels import conditional_setup
from dtk.runs import CHECKPOINT_NAME, keep_checkpoint, prepare_run_folder
from dtk.runtime.errors import DtkError, file_error
from dtk.stop import StopOnSignal
from dtk.train_config import PRECISIONS, TrainConfig, given_fields, learning_rate, resumed_config
from dtk.train_log import TrainingLog
from dtk.unet import PRESETS, UNet, count_parameters

__all__ = ["PRECISIONS", "TrainConfig", "Trainer", "autocast_dtype", "learning_rate", "train"]
GRID_GUIDANCE_SCALE = 1.25  # guidance of a conditional run's sample grids (benchmarks/quality_vs_guidance.py)


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
    """One run: the model, its optimizer and EMA, the data stream; `run()` trains to `config.steps`.

    `resume_from` is the run's checkpoint when resuming (already read by `train`, which restored the run's
    settings from it)."""

    def __init__(
        self,
        config: TrainConfig,
        ctx: distributed.Context,
        device: torch.device,
        resume_from: Checkpoint | None = None,
    ):
        config.validate()
        self.config = config
        self.out = Path(config.out)
        self.ctx, self.device = ctx, device
        self.log = _say if self.ctx.is_main else (lambda *a, **k: None)

        image_size = config.image_size or PRESETS[config.preset]["image_size"]
        config.model_config(config.channels or 3)  # fail on a bad model config before loading any data
        self.data: ImageSet = load_dataset(
            config.dataset, image_size, config.channels, progress=self.ctx.is_main
        )
        self.model_config = config.model_config(self.data.channels)
        self._warn_attention()
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
            self._resume(resume_from if resume_from is not None else load_checkpoint(self.checkpoint_path))
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

    def _warn_attention(self) -> None:
        config = self.model_config
        wanted = set(config.attention_resolutions)
        if wanted and not wanted & set(config.resolutions):
            self.log(
                f"warning: attention resolutions {','.join(map(str, sorted(wanted)))} match no level of "
                f"this U-Net at {config.image_size} px (levels {','.join(map(str, config.resolutions))}): "
                "only the middle block has self-attention; pass --attention-resolutions to choose levels"
            )

    def _resume(self, ckpt: Checkpoint) -> None:
        path = ckpt.path or self.checkpoint_path
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
        state = check_train_state(path, ckpt, self.raw_model, self.ema)
        try:
            self.raw_model.load_state_dict(ckpt.model_state)
            self.ema.load_state_dict(ckpt.ema_state, int(state["ema_updates"]))
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scaler is not None and state.get("grad_scaler"):
                self.scaler.load_state_dict(state["grad_scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise file_error(path, f"damaged training state: {_first_line(e)}") from None
        self.step = ckpt.step
        planned = state["config"].get("steps")
        if self.config.lr_schedule == "cosine" and planned != self.config.steps:
            self.log(
                f"note: the cosine learning-rate schedule was planned to end at step {planned} and now "
                f"ends at step {self.config.steps}; from step {self.step} on it follows the new length (so "
                f"this run is not the same as an uninterrupted {self.config.steps}-step one)"
            )
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
        config = self.config
        size = self.model_config.image_size
        shape = f"{self.model_config.in_channels}x{size}x{size}"
        where = str(self.device)
        if self.device.type == "cpu":  # on a busy machine fewer threads can be much faster: --threads
            threads = torch.get_num_threads()
            where += f" ({threads} thread{'s' if threads > 1 else ''})"
        self.log(
            f"training {config.preset} U-Net ({count_parameters(self.raw_model):,} parameters, {shape}) "
            f"on {len(self.data)} images from {self.data.source}, {self.ctx.world_size} process(es) "
            f"on {where}, precision {self.amp_dtype or torch.float32}"
        )
        self.raw_model.train()
        images_per_step = config.batch_size * config.grad_accum * self.ctx.world_size
        mode = TrainingLog.mode_for(config.progress, self.ctx.is_main)
        log = TrainingLog(
            self.out, self.step, config.steps, config.log_every, images_per_step, mode, self.log
        )
        started, first = time.perf_counter(), self.step
        try:
            with StopOnSignal() as stop:
                while self.step < config.steps:
                    lr = learning_rate(config, self.step)
                    loss = self.train_step()
                    if not math.isfinite(loss):
                        raise DtkError(
                            f"loss became {loss} at step {self.step}; lower --lr or use --precision fp32"
                        )
                    log.step(self.step, loss, lr)
                    done = self.step == config.steps
                    if config.save_every and self.step % config.save_every == 0 and not done:
                        self._save(log)
                    if config.sample_every and (self.step % config.sample_every == 0 or done):
                        grid = self.sample_grid()
                        if grid is not None:
                            log.say(f"step {self.step}: samples in {grid}")
                    if distributed.any_rank(self.ctx, stop.requested is not None, self.device) and not done:
                        self._save(log)
                        log.close()
                        self.log(
                            f"{stop.requested or 'stopped'}: saved {self.checkpoint_path} at step "
                            f"{self.step} of {config.steps}; continue with: "
                            f"dtk train --out {self.out} --resume"
                        )
                        raise KeyboardInterrupt
                self._save(log, announce=False)  # the line below says it
        finally:
            log.close()
        elapsed = time.perf_counter() - started
        self.log(
            f"wrote {self.checkpoint_path} at step {self.step} ({(self.step - first) / elapsed:.1f} steps/s)"
        )
        if self.ctx.distributed:
            self.log(f"{self.ctx.world_size} ranks in sync")
        return self.checkpoint_path

    def _save(self, log: TrainingLog, announce: bool = True) -> None:
        self.save()
        if self.ctx.is_main:
            keep_checkpoint(self.out, self.step, self.config.keep)
            log.saved(self.step, self.checkpoint_path, announce)


def check_train_state(path: Path, ckpt: Checkpoint, model: torch.nn.Module, ema: EMA) -> dict:
    """The checkpoint's training state, checked against the model before any of it is loaded."""

    def damaged(what: str) -> DtkError:
        return file_error(
            path, f"damaged training state: {what}; it cannot be resumed (--overwrite starts over)"
        )

    state = ckpt.train_state
    if not isinstance(state, dict):
        raise damaged(f"expected a dict, found {type(state).__name__}")
    updates = state.get("ema_updates")
    if isinstance(updates, bool) or not isinstance(updates, int) or updates < 0:
        raise damaged(f"ema_updates is {updates!r}, not a count")
    if ckpt.ema_state is None:
        raise damaged("it has no EMA weights")
    for what, weights in (("weights", ckpt.model_state), ("EMA weights", ckpt.ema_state)):
        for name, ref in model.state_dict().items():
            if name not in ema.shadow and what == "EMA weights":
                continue
            tensor = weights.get(name)
            if not torch.is_tensor(tensor) or tensor.shape != ref.shape:
                found = tuple(tensor.shape) if torch.is_tensor(tensor) else type(tensor).__name__
                raise damaged(f"{what} {name} is {found}, the model needs {tuple(ref.shape)}")
    optimizer = state.get("optimizer")
    if not (
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
    ):
        raise damaged("the optimizer state is not an AdamW state dict")
    params = list(model.parameters())
    for index, entry in optimizer["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(params) and isinstance(entry, dict)):
            raise damaged(f"the optimizer state names parameter {index!r} of {len(params)}")
        for key in ("exp_avg", "exp_avg_sq"):
            tensor = entry.get(key)
            if not torch.is_tensor(tensor) or tensor.shape != params[index].shape:
                raise damaged(f"the optimizer's {key} of parameter {index} does not fit it")
            if not torch.isfinite(tensor).all():
                raise damaged(f"the optimizer's {key} of parameter {index} holds NaN or infinity")
    return state


def _say(text: str = "") -> None:
    print(text, flush=True)  # lines reach a pipe or a log file as they happen


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def train(config: TrainConfig, given: set[str] | None = None) -> Path:
    """Train (or resume) per `config` and return the path of the written checkpoint.

    On resume the run's own settings are restored from its model.pt; `given` names the fields the caller set
    (the CLI passes the flags on its command line; None: the fields that differ from the defaults), and those
    must agree with the run's unless they may change (`CHANGEABLE_ON_RESUME`)."""
    config.validate()
    created = not Path(config.out).exists()
    prepare_run_folder(config.out, config.resume, config.overwrite)
    try:
        return _train(config, given)
    except BaseException:
        if created:  # a run that failed before writing anything leaves no empty folder behind
            with contextlib.suppress(OSError):
                Path(config.out).rmdir()
        raise


def _train(config: TrainConfig, given: set[str] | None) -> Path:
    ckpt = None
    config = dataclasses.replace(config, dataset=dataset_reference(config.dataset))
    if config.resume:
        ckpt = load_checkpoint(Path(config.out) / CHECKPOINT_NAME)
        if ckpt.train_state is None:
            raise file_error(
                ckpt.path, "has no training state to resume from (it was saved for inference only)"
            )
        if not isinstance(ckpt.train_state, dict):
            found = type(ckpt.train_state).__name__
            raise file_error(ckpt.path, f"damaged training state: expected a dict, found {found}")
        stored = ckpt.train_state.get("config")
        if not isinstance(stored, dict):
            raise file_error(ckpt.path, "damaged training state: the run's settings are missing")
        if isinstance(stored.get("dataset"), str):  # a run from before folders were stored absolute
            stored = {**stored, "dataset": dataset_reference(stored["dataset"])}
        config = resumed_config(
            config, stored, given_fields(config) if given is None else set(given), ckpt.path
        )
        try:
            config.validate()
        except DtkError as e:
            raise file_error(
                ckpt.path, f"damaged training state: the run's settings are invalid ({e})"
            ) from None
    ctx, device = distributed.setup(config.device)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return Trainer(config, ctx, device, ckpt).run()
    finally:
        torch.set_num_threads(threads)
        distributed.teardown(ctx)
