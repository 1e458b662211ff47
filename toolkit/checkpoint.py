"""`model.pt`: a versioned dict of configs and weights, written atomically and read with weights_only=True.

Layout (every value a tensor or plain Python data, so torch's weights-only unpickler can read it):

    {"format": "dtk.checkpoint", "version": 1, "step": int,
     "model_config": UNetConfig.to_dict(), "diffusion": DiffusionConfig.to_dict(),
     "model_state": {name: tensor}, "ema_state": {name: tensor} | None,
     "train_state": {"optimizer", "grad_scaler", "ema_updates", "config", ...} | None}

A file that is not such a dict, a truncated one, or one whose pickle would import code gets a DtkError.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from dtk.runtime.checks import check_config_fields, check_diffusion_fields, need_int
from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.files import atomic_path
from dtk.runtime.schedule import DiffusionConfig
from dtk.unet import UNet, UNetConfig

FORMAT = "dtk.checkpoint"
VERSION = 1
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass
class Checkpoint:
    model_config: UNetConfig
    diffusion: DiffusionConfig
    model_state: dict
    ema_state: dict | None
    step: int
    train_state: dict | None
    path: Path | None = None

    def build_model(self, weights: str = "ema"):
        """The U-Net with the EMA (or raw) weights, eval mode, on the CPU. Without EMA weights: raw."""
        if weights not in ("ema", "raw"):
            raise DtkError(f"weights must be 'ema' or 'raw', got {weights!r}")
        state = self.ema_state if weights == "ema" and self.ema_state is not None else self.model_state
        model = UNet(self.model_config)
        _check_weights(self.path or "checkpoint", state, model.state_dict())
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            where = self.path or "checkpoint"
            detail = "; ".join(
                part
                for part in (
                    f"missing {', '.join(missing[:3])}" if missing else "",
                    f"unexpected {', '.join(unexpected[:3])}" if unexpected else "",
                )
                if part
            )
            raise file_error(where, f"weights do not match the U-Net config ({detail})")
        return model.eval()

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "step": int(self.step),
            "model_config": self.model_config.to_dict(),
            "diffusion": self.diffusion.to_dict(),
            "model_state": self.model_state,
            "ema_state": self.ema_state,
            "train_state": self.train_state,
        }


def save_checkpoint(path, ckpt: Checkpoint) -> Path:
    """Write `ckpt` to `path` atomically (temporary file, then rename)."""
    import torch

    path = Path(path)
    data = ckpt.to_dict()
    try:
        with atomic_path(path) as tmp:
            torch.save(data, tmp)
    except RuntimeError as e:  # torch's zip writer reports a short write (a full disk) as RuntimeError
        raise file_error(path, f"cannot write ({_write_failure(path, data, e)})") from None
    return path


def _write_failure(path: Path, data: dict, error: RuntimeError) -> str:
    import shutil

    import torch

    need = sum(
        t.numel() * t.element_size()
        for state in (data["model_state"], data["ema_state"] or {})
        for t in state.values()
        if isinstance(t, torch.Tensor)
    )
    if shutil.disk_usage(path.parent).free < need:
        return f"no space left on device: {need / 2**20:.1f} MiB of weights"
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_checkpoint(path) -> Checkpoint:
    """Read a dtk checkpoint with torch.load(weights_only=True): tensors and plain data only, never code."""
    import torch

    path = Path(path)
    if not path.exists():
        raise file_error(path, "no such checkpoint file")
    if path.is_dir():
        raise file_error(path, "is a directory, not a checkpoint file (model.pt)")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise file_error(path, "empty file, not a dtk checkpoint")
    try:
        with (
            warnings.catch_warnings()
        ):  # torch warns about a raw pickle's protocol on stderr; we say one line
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError... for bad files
        raise _load_error(path, head, e) from None
    return _from_dict(path, data)


def _load_error(path: Path, head: bytes, error: Exception) -> DtkError:
    message = str(error)
    unsafe = re.search(r"GLOBAL ([\w.]+)", message)
    if unsafe:
        return file_error(
            path,
            f"refused to load: its pickle imports {unsafe.group(1)}, which could run code "
            "(dtk reads checkpoints with torch.load(weights_only=True): tensors and plain data only)",
        )
    if head == _ZIP_MAGIC:
        return file_error(path, "truncated or corrupt checkpoint (the PyTorch zip archive is incomplete)")
    return file_error(path, "not a dtk checkpoint (not a PyTorch file of tensors and plain data)")


def _from_dict(path: Path, data) -> Checkpoint:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        hint = " (it looks like a bare state_dict)" if isinstance(data, dict) and "format" not in data else ""
        raise file_error(path, f"not a dtk checkpoint: no '{FORMAT}' format marker{hint}")
    version = data.get("version")
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise file_error(
            path, f"checkpoint version {version!r} is not supported by this dtk (it reads {VERSION})"
        )
    try:
        model_fields, diffusion_fields = dict(data["model_config"]), dict(data["diffusion"])
        check_config_fields(model_fields, UNetConfig)
        check_diffusion_fields(diffusion_fields, DiffusionConfig)
        model_config = UNetConfig.from_dict(model_fields)
        diffusion = DiffusionConfig.from_dict(diffusion_fields)
        model_state, ema_state = data["model_state"], data.get("ema_state")
        step = need_int(data["step"], "step", 0)
    except KeyError as e:
        raise file_error(path, f"damaged dtk checkpoint: missing {e}") from None
    except (TypeError, ValueError) as e:
        raise file_error(path, f"damaged dtk checkpoint: {e}") from None
    except DtkError as e:
        raise file_error(path, f"bad config in checkpoint: {e}") from None
    if not isinstance(model_state, dict) or not (ema_state is None or isinstance(ema_state, dict)):
        raise file_error(path, "damaged dtk checkpoint: weights are not a state dict")
    import torch

    for state in (model_state, ema_state or {}):
        bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise file_error(path, f"damaged dtk checkpoint: weight {bad} is not a tensor")
    return Checkpoint(
        model_config=model_config,
        diffusion=diffusion,
        model_state=model_state,
        ema_state=ema_state,
        step=step,
        train_state=data.get("train_state"),
        path=path,
    )


def _check_weights(where, state: dict, expected: dict) -> None:
    """Each weight the U-Net has is a floating tensor of its shape (load_state_dict would say so in a
    multi-line RuntimeError, or copy ints silently)."""
    import torch

    for name, reference in expected.items():
        value = state.get(name)
        if value is None:
            continue  # reported as missing by the caller
        if not isinstance(value, torch.Tensor):
            raise file_error(where, f"weight {name} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(reference.shape):
            raise file_error(
                where,
                f"weight {name} has shape {list(value.shape)}, "
                f"the U-Net config needs {list(reference.shape)}",
            )
        if value.dtype.is_floating_point != reference.dtype.is_floating_point:
            raise file_error(where, f"weight {name} is {value.dtype}, the U-Net needs {reference.dtype}")


def describe_checkpoint(ckpt: Checkpoint) -> dict:
    """What `dtk inspect` shows: configs, parameter count, step, schedule, what the file holds."""
    config = ckpt.model_config
    diffusion = ckpt.diffusion
    alphas_cumprod = diffusion.alphas_cumprod
    train = ckpt.train_state or {}
    info = {
        "kind": "dtk checkpoint",
        "path": str(ckpt.path) if ckpt.path else None,
        "format": f"{FORMAT} v{VERSION}",
        "step": ckpt.step,
        "parameters": sum(int(v.numel()) for v in ckpt.model_state.values()),
        "image_shape": [config.in_channels, config.image_size, config.image_size],
        "model": config.to_dict(),
        "diffusion": diffusion.to_dict(),
        "schedule": {
            "beta_schedule": diffusion.beta_schedule,
            "num_train_timesteps": diffusion.num_train_timesteps,
            "beta_first": float(diffusion.betas[0]),
            "beta_last": float(diffusion.betas[-1]),
            "alphas_cumprod_last": float(alphas_cumprod[-1]),
        },
        "prediction_type": diffusion.prediction_type,
        "weights": ["raw", "ema"] if ckpt.ema_state is not None else ["raw"],
        "resumable": ckpt.train_state is not None,
    }
    if "config" in train:
        info["training"] = dict(train["config"])
    return info
