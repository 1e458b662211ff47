"""Flags are checked up front: bench's seed, duration, sampler and steps before any timing, and a sample
count that cannot fit in memory refused with the memory it would need."""

from __future__ import annotations

import pytest

from dtk.cli import main

QUICK = ["--warmup", "2", "--iterations", "2", "--duration", "0"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "-1"], "Invalid value for '--seed': -1 is not in the range x>=0"),
        (["--duration", "inf"], "Invalid value for '--duration': inf is not a finite number of seconds"),
        (["--duration", "nan"], "Invalid value for '--duration'"),
        (["--iterations", "0"], "Invalid value for '--iterations': 0 is not in the range x>=1"),
        (["--steps", "2", "--sampler", "euler"], "Invalid value for '--sampler': 'euler' is not one of"),
    ],
)
def test_bench_flags_are_usage_errors(tiny_bundle, capsys, args, message):
    assert main(["bench", str(tiny_bundle), *QUICK, *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "timing" not in err


def test_bench_steps_beyond_the_schedule_fail_before_timing(tiny_bundle, capsys):
    assert main(["bench", str(tiny_bundle), *QUICK, "--steps", "5000", "--no-system"]) == 1
    err = capsys.readouterr().err
    assert (
        err == "error: steps must be between 1 and num_train_timesteps (1000), got 5000\n"
    )  # no "timing ..."


@pytest.mark.parametrize("source", ["bundle", "checkpoint"])
def test_sample_num_that_cannot_fit_is_refused(tiny_bundle, tiny_checkpoint, tmp_path, capsys, source):
    path = tiny_bundle if source == "bundle" else tiny_checkpoint
    out = tmp_path / "grid.png"
    assert main(["sample", str(path), "--num", str(10**12), "--out", str(out), "--no-progress"]) == 1
    err = capsys.readouterr().err
    # 10^12 x 256 values x 6 bytes
    assert err.startswith(
        f"error: --num {10**12}: {10**12} images of 1x16x16 would need 1397.0 TiB of memory and"
    )
    assert err.endswith("available; sample fewer per run (several runs with other --seed values)\n")
    assert not out.exists()
