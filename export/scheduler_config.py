"""`scheduler_config.json` in every bundle: the schedule and sampling options as the diffusers scheduler of
the bundle's default sampler, so `<Scheduler>.from_pretrained(bundle)` samples as dtk does."""

from __future__ import annotations

import json
from pathlib import Path

from dtk.runtime.diffusers_config import reproduction_gaps
from dtk.runtime.files import write_text
from dtk.runtime.schedule import DEFAULT_SAMPLER, DiffusionConfig

SCHEDULER_CONFIG_NAME = "scheduler_config.json"


def write_scheduler_config(bundle_dir, diffusion: DiffusionConfig) -> tuple[Path, list[str]]:
    """Write bundle_dir/scheduler_config.json → (its path, what diffusers would still do differently)."""
    sampler = diffusion.sampler or DEFAULT_SAMPLER
    config = {**diffusion.to_diffusers(sampler), "_diffusers_version": _diffusers_version()}
    path = Path(bundle_dir) / SCHEDULER_CONFIG_NAME
    write_text(path, json.dumps(config, indent=2) + "\n")
    gaps = [f"{SCHEDULER_CONFIG_NAME}: {gap}" for gap in reproduction_gaps(diffusion, sampler)]
    return path, gaps


def _diffusers_version() -> str:
    """The diffusers release the config's fields are those of (diffusers only reads it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.30.0"
