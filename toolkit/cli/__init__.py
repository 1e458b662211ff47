"""The `dtk` command. Each subcommand lives in its own module and is imported only when it runs."""

from __future__ import annotations

import importlib
import sys

import click

from dtk import __version__

# command name -> (module under dtk.cli, one-line help)
COMMANDS = {
    "train": ("train", "Train a DDPM U-Net and write model.pt."),
    "sample": ("sample", "Sample images from a checkpoint, a bundle, an .onnx or a .plan."),
    "export": ("export", "Export a checkpoint or diffusers UNet2DModel to a bundle (ONNX, TensorRT)."),
    "build-engine": ("build_engine", "Build unet.plan for a bundle with TensorRT."),
    "inspect": ("inspect", "Describe a checkpoint, bundle, .onnx or .plan."),
    "bench": ("bench", "Measure denoiser latency and end-to-end sampling, trtexec style."),
    "triton": ("triton", "Write a Triton Inference Server repository for a bundle."),
    "serve": ("serve", "Serve a bundle on a local Triton Inference Server (whole-image requests)."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"dtk.cli.{COMMANDS[name][0]}")
        return module.command

    def format_commands(self, ctx, formatter):
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dtk")
@click.option("--debug", is_flag=True, help="Show the full traceback on errors.")
@click.pass_context
def cli(ctx, debug):
    """dtk: diffusion models from PyTorch training to an edge GPU."""
    ctx.obj = {"debug": debug}


def main(argv=None) -> int:
    """Console entry point: a DtkError becomes one line on stderr and a non-zero exit."""
    from dtk.runtime.errors import DtkError

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        cli.main(args=argv, prog_name="dtk", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except DtkError as e:
        if debug:
            raise
        click.echo(f"error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    return 0


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
