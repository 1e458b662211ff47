"""What `dtk export` reads: a dtk checkpoint or a diffusers UNet2DModel folder, as denoiser + schedule.

Either source becomes a `ModelSource`: a module with the (sample [B,C,H,W] float32, timestep [B] float32) →
model output [B,C,H,W] signature that the ONNX graph will have, the diffusion config, and what the manifest
records about where it came from.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from dtk.runs import run_checkpoint
from dtk.runtime.checks import check_diffusion_fields
from dtk.runtime.errors import DtkError, file_error
from dtk.runtime.files import sha256
from dtk.runtime.schedule import DiffusionConfig

WEIGHTS = ("ema", "raw")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


@dataclass
class ModelSource:
    """A loaded model ready to export."""

    module: object  # torch.nn.Module in eval mode on the CPU, signature (sample, timestep) -> output
    diffusion: DiffusionConfig
    image_size: tuple[int, int]  # (H, W)
    in_channels: int
    out_channels: int
    info: dict  # manifest "source": kind, path, sha256, ...
    model_info: dict  # manifest "model": architecture, config, parameter count
    warnings: list[str] = field(default_factory=list)
    classes: dict | None = None  # class-conditional: num_classes, names, null_class (dtk.runtime.guidance)
    num_class_embeds: int | None = None  # rows of the class embedding; the graph then takes class_labels

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.image_size)


def load_source(path: str | Path, weights: str = "ema") -> ModelSource:
    """A dtk checkpoint file or run folder (its model.pt), or a diffusers UNet2DModel folder (or a pipeline
    folder with `unet/` in it)."""
    path = Path(path)
    if weights not in WEIGHTS:
        raise DtkError(f"unknown weights {weights!r}; choose one of {', '.join(WEIGHTS)}")
    if not path.exists():
        raise file_error(path, "no such file or directory")
    if path.is_dir():
        run = run_checkpoint(path)
        return _load_checkpoint(run, weights) if run is not None else _load_diffusers(path)
    if path.suffix in (".onnx", ".plan"):
        raise file_error(
            path, "already exported; `dtk export` takes a checkpoint (model.pt) or a diffusers folder"
        )
    return _load_checkpoint(path, weights)


def denoiser_module(net, unwrap_sample: bool = False):
    """Wrap `net` so that forward is exactly (sample, timestep) -> tensor, whatever the network returns."""
    import torch

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, sample, timestep, class_labels=None):
            if class_labels is None:
                out = self.net(sample, timestep)
            else:
                out = self.net(sample, timestep, class_labels=class_labels)
            return out.sample if unwrap_sample else out

    return Denoiser().eval()


def parameter_count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _load_checkpoint(path: Path, weights: str) -> ModelSource:
    from dtk.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path)
    warnings = []
    if weights == "ema" and ckpt.ema_state is None:
        warnings.append(f"{path}: has no EMA weights; exporting the raw weights")
        weights = "raw"
    net = ckpt.build_model(weights=weights)
    config = ckpt.model_config
    size = config.image_size
    module = denoiser_module(net)
    return ModelSource(
        module=module,
        diffusion=ckpt.diffusion,
        image_size=(size, size) if isinstance(size, int) else tuple(size),
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        info={
            "kind": "dtk-checkpoint",
            "path": str(path.resolve()),
            "sha256": sha256(path),
            "weights": weights,
            "step": int(ckpt.step),
            "dataset": ((ckpt.train_state or {}).get("config") or {}).get("dataset"),
        },
        model_info={
            "architecture": "dtk.UNet",
            "config": config.to_dict(),
            "parameters": parameter_count(net),
        },
        warnings=warnings,
        classes=ckpt.classes,
        num_class_embeds=config.num_class_embeds,
    )


def _diffusers_layout(path: Path) -> tuple[Path, Path | None]:
    """(UNet folder, scheduler_config.json or None) for a UNet2DModel folder or a pipeline folder."""
    if (path / "model_index.json").is_file() and (path / "unet" / "config.json").is_file():
        unet_dir = path / "unet"
    elif (path / "config.json").is_file():
        unet_dir = path
    else:
        raise file_error(
            path,
            "not a run folder (no model.pt), a checkpoint or a diffusers model folder (no config.json); "
            "save one with UNet2DModel.save_pretrained(folder)",
        )
    candidates = [unet_dir / "scheduler_config.json", unet_dir.parent / "scheduler" / "scheduler_config.json"]
    scheduler = next((c for c in candidates if c.is_file()), None)
    return unet_dir, scheduler


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise file_error(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise file_error(path, "expected a JSON object")
    return data


def _diffusion_from_scheduler(path: Path) -> DiffusionConfig:
    data = _read_json(path)  # every field is honoured or refused by from_dict, _class_name sets the sampler
    try:
        check_diffusion_fields(data, DiffusionConfig)  # a float T, a beta_end of 2: named with the file
        return DiffusionConfig.from_dict(data)
    except (DtkError, TypeError, ValueError) as e:
        raise file_error(path, str(e)) from None


def _check_unet_config(config_path: Path, config: dict) -> None:
    kind = config.get("_class_name")
    if kind != "UNet2DModel":
        raise file_error(
            config_path, f"is a {kind or 'unknown model'}; dtk exports diffusers UNet2DModel only"
        )
    if config.get("time_embedding_type", "positional") != "positional":
        raise file_error(
            config_path,
            f"time_embedding_type {config['time_embedding_type']!r} is not a DDPM model; "
            "dtk exports UNet2DModels with the positional (DDPM) timestep embedding",
        )
    if config.get("class_embed_type"):
        raise file_error(
            config_path,
            f"class_embed_type {config['class_embed_type']!r} is not supported; dtk exports "
            "class-conditional UNet2DModels with num_class_embeds and class_embed_type null",
        )


def _folder_digest(files: list[Path]) -> str:
    """sha256 over "name sha256" lines of the files a diffusers model is made of."""
    lines = "".join(f"{f.name} {sha256(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _load_diffusers(path: Path) -> ModelSource:
    unet_dir, scheduler_path = _diffusers_layout(path)
    config_path = unet_dir / "config.json"
    config = _read_json(config_path)
    _check_unet_config(config_path, config)
    weight_files = [unet_dir / name for name in DIFFUSERS_WEIGHTS if (unet_dir / name).is_file()]
    if not weight_files:
        raise file_error(unet_dir, f"no weights ({' or '.join(DIFFUSERS_WEIGHTS)})")

    warnings = []
    if scheduler_path is None:
        warnings.append(
            f"{path}: no scheduler_config.json; assuming dtk's default schedule (linear, T=1000, epsilon)"
        )
        diffusion = DiffusionConfig()
    else:
        diffusion = _diffusion_from_scheduler(scheduler_path)

    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise DtkError("exporting a diffusers model needs diffusers: pip install diffusers") from None
    try:
        net = UNet2DModel.from_pretrained(unet_dir, local_files_only=True).eval()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise file_error(unet_dir, f"diffusers could not load this UNet2DModel ({e})") from None

    size = net.config.sample_size
    if size is None:
        raise file_error(config_path, "sample_size is not set; dtk needs the image size")
    hashed = [config_path, weight_files[0]] + ([scheduler_path] if scheduler_path else [])
    return ModelSource(
        module=denoiser_module(net, unwrap_sample=True),
        diffusion=diffusion,
        image_size=(size, size) if isinstance(size, int) else tuple(int(s) for s in size),
        in_channels=int(net.config.in_channels),
        out_channels=int(net.config.out_channels),
        info={
            "kind": "diffusers",
            "path": str(path.resolve()),
            "sha256": _folder_digest(hashed),
            "sha256_of": [str(f.relative_to(path)) if f.is_relative_to(path) else str(f) for f in hashed],
            "scheduler": str(scheduler_path) if scheduler_path else None,
        },
        model_info={
            "architecture": "diffusers.UNet2DModel",
            "config": {k: v for k, v in dict(net.config).items() if not k.startswith("_")},
            "parameters": parameter_count(net),
        },
        warnings=warnings,
        **_diffusers_classes(net.config.num_class_embeds, warnings, path),
    )


def _diffusers_classes(num_class_embeds, warnings: list, path: Path) -> dict:
    """A diffusers model's classes: diffusers defines no null class, so guidance is not offered."""
    if not num_class_embeds:
        return {}
    warnings.append(
        f"{path}: class-conditional with {num_class_embeds} classes and no recorded null class; "
        "it samples with labels, without classifier-free guidance"
    )
    classes = {"num_classes": int(num_class_embeds), "names": None, "null_class": None}
    return {"classes": classes, "num_class_embeds": int(num_class_embeds)}
