"""The `dtk_sampler` defaults of `dtk serve`, `dtk triton` and `dtk export --triton`: steps and sampler."""

from __future__ import annotations

import click

from dtk.runtime.samplers import SAMPLERS


def serve_options(command):
    """Decorator adding --serve-steps and --serve-sampler; the command gets serve_steps and serve_sampler."""
    command = click.option(
        "--serve-sampler",
        type=click.Choice(SAMPLERS),
        default="ddim",
        show_default=True,
        help="Served model: sampler of requests that send no `sampler` parameter.",
    )(command)
    return click.option(
        "--serve-steps",
        type=click.IntRange(min=1),
        default=50,
        show_default=True,
        help="Served model: steps of requests that send no `steps` input.",
    )(command)
