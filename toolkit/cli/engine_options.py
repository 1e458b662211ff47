"""The TensorRT engine flags of `dtk build-engine` and `dtk export --engine`, and their EngineOptions."""

from __future__ import annotations

import click


class GpuIndex(click.ParamType):
    """A GPU as the other commands name it, `cuda:N` or `cuda`, or as its index N."""

    name = "N|cuda:N"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        index = text.removeprefix("cuda").removeprefix(":") if text.startswith("cuda") else text
        if index == "" and text == "cuda":
            return 0
        if not index.isdigit():
            self.fail(f"{value!r} is not a GPU: give N, cuda or cuda:N", param, ctx)
        return int(index)


# flag -> (click.option keywords, help); the order here is the order in --help
_FLAGS = {
    "--workspace": (
        {"type": click.IntRange(min=1), "metavar": "MiB"},
        "Cap TensorRT's scratch memory (small Jetson boards).",
    ),
    "--timing-cache": (
        {"type": click.Path(dir_okay=False, path_type=str)},
        "Reuse this timing cache and write it back (faster rebuilds on the same GPU).",
    ),
    "--opt-level": ({"type": click.IntRange(0, 5)}, "Builder optimization level (TensorRT default 3)."),
    "--hardware-compat": ({"is_flag": True}, "One plan for every Ampere-or-newer GPU (sm_80+)."),
    "--version-compat": ({"is_flag": True}, "Let later TensorRT versions load the plan."),
    "--strongly-typed": ({"is_flag": True}, "Build strongly typed on TensorRT 10, as 11 always does."),
    "--device": ({"type": GpuIndex(), "default": 0, "show_default": True}, "GPU to build on (N or cuda:N)."),
    "--engine-name": (
        {"metavar": "NAME"},
        "Write unet-NAME.plan beside the bundle's other engines (one per GPU model or precision, "
        "e.g. orin-nx-fp16); the runtime takes the one whose sidecar matches the machine.",
    ),
}


def _prefixed(prefix: str, text: str) -> str:
    """ "Engine: " + "Cap ..." → "Engine: cap ..."; an acronym ("GPU ...") keeps its capitals."""
    if prefix and text[1:2].islower():
        text = text[0].lower() + text[1:]
    return prefix + text


def engine_options(prefix: str = ""):
    """Decorator adding the engine flags to a click command; the command gets them as keyword arguments
    (workspace, timing_cache, opt_level, hardware_compat, version_compat, strongly_typed, device,
    engine_name).
    `prefix` starts each help text, e.g. "Engine: " where the command has other flags too."""

    def decorate(command):
        for flag, (kwargs, help_) in reversed(_FLAGS.items()):
            command = click.option(flag, help=_prefixed(prefix, help_), **kwargs)(command)
        return command

    return decorate


def engine_options_from_flags(
    precision,
    workspace,
    timing_cache,
    opt_level,
    hardware_compat,
    version_compat,
    strongly_typed,
    device,
    engine_name=None,
    verbose=False,
    **check,
):
    """The engine flags (as click passes them) → dtk.export.tensorrt.EngineOptions; `check`: verify, atol,
    rtol, chain_atol (the engine check against ONNX Runtime)."""
    from dtk.export.tensorrt import EngineOptions

    return EngineOptions(
        engine_name=engine_name,
        **check,
        precision=precision,
        workspace=workspace,
        timing_cache=timing_cache,
        opt_level=opt_level,
        hardware_compat="ampere+" if hardware_compat else "none",
        version_compat=version_compat,
        strongly_typed=strongly_typed,
        device=device,
        verbose=verbose,
    )
