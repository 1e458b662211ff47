"""Type and range checks for values read from files (dtk.json, model.pt), before anything uses them.

JSON and pickles hold whatever someone wrote: a float `num_train_timesteps`, `null` for a file name, a list
where a dict belongs. Each check raises DtkError with a message that names the field.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import PurePosixPath

from dtk.runtime.errors import DtkError

MAX_TIMESTEPS = 1_000_000  # the schedule arrays of a larger T alone would take tens of MB per array


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def need_int(value, name: str, low: int | None = None, high: int | None = None) -> int:
    if not is_int(value):
        raise DtkError(f"{name} must be an integer, got {value!r}")
    if low is not None and value < low:
        raise DtkError(f"{name} must be at least {low}, got {value}")
    if high is not None and value > high:
        raise DtkError(f"{name} must be at most {high}, got {value}")
    return value


def need_type(value, name: str, kind: type, what: str):
    if not isinstance(value, kind):
        raise DtkError(f"{name} must be {what}, got {value!r}"[:200])
    return value


def need_file_name(value, name: str, optional: bool = False) -> str | None:
    """A path inside the bundle: relative, no `..`, not empty."""
    if value is None and optional:
        return None
    if not isinstance(value, str) or not value.strip():
        raise DtkError(f"{name} must be a file name in the bundle, got {value!r}")
    path = PurePosixPath(value.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or value.startswith("~"):
        raise DtkError(f"{name} {value!r} leaves the bundle; it must name a file inside it")
    return value


def check_config_fields(data: dict, config_class) -> None:
    """Every field of a config dataclass present in `data` has its annotated type (int, float, bool, str, or a
    tuple of integers); fields with other annotations are left to the class."""
    for field in dataclasses.fields(config_class):
        if field.name not in data:
            continue
        value, kind = data[field.name], getattr(field.type, "__name__", field.type)
        if kind == "bool" and not isinstance(value, bool):
            raise DtkError(f"{field.name} must be true or false, got {value!r}")
        if kind == "int" and not is_int(value):
            raise DtkError(f"{field.name} must be an integer, got {value!r}")
        if kind == "float" and not is_number(value):
            raise DtkError(f"{field.name} must be a finite number, got {value!r}")
        if kind == "str" and not isinstance(value, str):
            raise DtkError(f"{field.name} must be a string, got {value!r}")
        if kind == "tuple" and not (isinstance(value, (list, tuple)) and all(is_int(v) for v in value)):
            raise DtkError(f"{field.name} must be a list of integers, got {value!r}")


def check_diffusion_fields(data: dict, config_class) -> None:
    """The diffusion config's types (check_config_fields) and the ranges its math needs."""
    check_config_fields(data, config_class)
    steps = data.get("num_train_timesteps")
    if is_int(steps) and steps > MAX_TIMESTEPS:
        raise DtkError(
            f"num_train_timesteps {steps} is absurd (at most {MAX_TIMESTEPS}; its schedule alone would need "
            f"{steps * 8 * 4 / 2**30:.1f} GiB)"
        )
    for name in ("beta_start", "beta_end"):
        if name in data and not 0 < data[name] < 1:
            raise DtkError(f"{name} must lie in (0, 1), got {data[name]}")
    offset = data.get("steps_offset", 0)
    if offset < 0:
        raise DtkError(f"steps_offset must be 0 or more, got {offset}")
    if is_int(steps) and offset > steps - 1:
        raise DtkError(f"steps_offset {offset} is beyond the schedule's last timestep ({steps - 1})")
    if "clip_sample_range" in data and not data["clip_sample_range"] > 0:
        raise DtkError(f"clip_sample_range must be positive, got {data['clip_sample_range']}")
