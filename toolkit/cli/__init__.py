"""The `dtk` command. Each subcommand lives in its own module and is imported only when it runs."""

from __future__ import annotations

import importlib
import signal
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


# a module a command needs → the extra that installs it
EXTRAS = {
    "torch": "train",
    "sklearn": "train",
    "onnx": "export",
    "onnxscript": "export",
    "onnxslim": "export",
    "onnxruntime": "runtime",
    "tensorrt": "tensorrt",
    "cuda": "tensorrt",
    "matplotlib": "bench",
}


def main(argv=None) -> int:
    """Console entry point: a DtkError, an OSError or a missing extra becomes one line on stderr and a
    non-zero exit; Ctrl-C and SIGTERM exit 130."""
    from dtk.runtime.errors import DtkError, one_line, os_error

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    previous = _sigterm_as_interrupt()
    try:
        # not cli.main(): it turns KeyboardInterrupt into Abort ("aborted") after printing a blank line
        with cli.make_context("dtk", argv) as ctx:
            cli.invoke(ctx)
    except click.exceptions.Exit as e:  # --help, --version
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as e:
        click.echo(usage_error(e), err=True)
        return e.exit_code
    except (DtkError, OSError, ModuleNotFoundError) as e:
        if debug:
            raise
        if isinstance(e, ModuleNotFoundError):
            e = missing_extra(e, next((a for a in argv if a in COMMANDS), None))
        elif isinstance(e, OSError):
            e = os_error(e)
        click.echo(f"error: {one_line(str(e))}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0


def usage_error(error: click.ClickException) -> str:
    """click's own errors in dtk's shape: `error: <what is wrong> (see 'dtk <command> --help')`."""
    text = f"error: {error.format_message()}"
    ctx = getattr(error, "ctx", None)
    if isinstance(error, click.UsageError) and ctx is not None:
        text += f" (see '{ctx.command_path} --help')"
    return text


def missing_extra(error: ModuleNotFoundError, command: str | None = None):
    """`No module named 'torch'` → a DtkError naming the pip extra that installs it (a runtime-only install,
    as in the CPU and Jetson images, has neither torch nor onnx)."""
    from dtk.runtime.errors import DtkError

    root = (error.name or "").split(".")[0]
    extra = EXTRAS.get(root)
    if extra is None:
        return DtkError(f"{error} (a broken install? reinstall dtk)")
    if command == "export" and extra == "train":
        extra = "export"  # torch, but the export extra brings onnx too
    what = f"dtk {command}" if command else "this"
    return DtkError(f"{what} needs {root}, which is not installed here: pip install 'dtk[{extra}]'")


def _sigterm_as_interrupt():
    """SIGTERM (docker stop, kill) raises KeyboardInterrupt like Ctrl-C, so cleanup runs and dtk exits 130.
    Returns the previous handler, or None where signals cannot be set (not the main thread)."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        return None


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
