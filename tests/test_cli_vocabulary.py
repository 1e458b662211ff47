"""One CLI vocabulary: walk every command's --help and check the shared flags mean the same everywhere;
click's own usage errors carry dtk's `error:` prefix; bench's --warmup, --json, --plot and load warning."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from dtk.cli import COMMANDS, main
from dtk.cli.bench import _load_average
from dtk.runtime.bench import comparison_columns, comparison_rows, format_table

WRITES = {"train", "sample", "export", "bench", "triton"}  # build-engine writes into its BUNDLE
LONG = {"train", "sample", "export", "build-engine"}  # commands with progress bars


def _help(command: str, capsys) -> str:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"Usage: dtk {command} ")
    return text


def _flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", text))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_speaks_the_same_flags(command, capsys):
    text = _help(command, capsys)
    flags = _flags(text)
    if command in WRITES:
        assert re.search(r"-o, --out", text), f"{command}: no -o/--out"
    if "--batch-size" in flags:
        assert "--batch" in flags, f"{command}: the batch is --batch"
    if "--json" in flags:
        assert re.search(r"--json Print the \w+ as JSON instead of the text", " ".join(text.split())), command
    if command in LONG:
        assert "--progress / --no-progress" in text, command
    assert "--no-progress" not in flags or "--progress" in flags


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--lr", "nan"], "error: Invalid value for '--lr': nan is not a finite number."),
        (["sample", "x", "--bogus"], "error: No such option '--bogus'"),
        (["nothing"], "error: No such command 'nothing'."),
        (["export", "--device", "tpu:0"], "error: Invalid value for '--device': 'tpu:0' is not a GPU"),
    ],
)
def test_usage_errors_are_one_error_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert err.rstrip().endswith("--help')")


def test_gpu_is_named_like_the_other_commands():
    from dtk.cli.engine_options import GpuIndex

    assert [GpuIndex().convert(v, None, None) for v in ("1", "cuda", "cuda:2", 3)] == [1, 0, 2, 3]


def test_bench_compare_puts_the_whole_sample_in_the_table_and_plots_it(tiny_bundle, tmp_path):
    plot = tmp_path / "compare.png"
    argv = [sys.executable, "-m", "dtk", "bench", str(tiny_bundle), "--compare", "torch,onnxruntime"]
    argv += ["--warmup", "1x", "--iterations", "3", "--duration", "0", "--threads", "1"]
    argv += ["--steps", "2", "--sample-runs", "1", "--plot", str(plot), "--json"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)  # --json: the results on stdout, nothing else
    assert [r["backend"] for r in data["results"]] == ["torch", "onnxruntime"]
    assert all(r["end_to_end"]["steps"] == 2 and "load_average" in r for r in data["results"])
    from PIL import Image

    with Image.open(plot) as picture:
        assert picture.format == "PNG" and picture.size[0] == 1100  # two panels: per call, end to end
    # the table that --compare prints without --json
    table = format_table(comparison_rows(data["results"]), comparison_columns(data["results"])).splitlines()
    assert table[0].endswith("vs torch eager  sample ms  sample images/s")
    e2e = data["results"][1]["end_to_end"]
    total = e2e["split_ms"]["total_ms"]
    shown = f"{total:.3f}" if total < 100 else f"{total:.1f}"
    assert table[2].split()[-2:] == [shown, f"{e2e['images_per_s']:.2f}"]  # the onnxruntime row


def test_bench_plot_needs_compare_and_png(tiny_bundle, tmp_path, capsys):
    assert main(["bench", str(tiny_bundle), "--plot", str(tmp_path / "p.png")]) == 1
    assert "--plot draws the --compare table as PNG" in capsys.readouterr().err


def test_bench_warns_when_the_machine_is_busy(tiny_bundle, monkeypatch, capsys):
    import os

    monkeypatch.setattr(os, "getloadavg", lambda: (64.0, 64.0, 64.0))
    quick = ["--warmup", "1x", "--iterations", "2", "--duration", "0", "--no-system", "--json"]
    assert main(["bench", str(tiny_bundle), *quick]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["load_average"] == 64.0
    assert f"warning: the load average was 64.0 on {os.cpu_count()} cores while measuring" in err
    assert _load_average() == 64.0
