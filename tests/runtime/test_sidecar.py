"""unet.plan.json: reading it; refusing plans built for another TensorRT or GPU unless built compatible."""

from __future__ import annotations

import hashlib
import json
import sys

import pytest

from dtk.runtime.errors import DtkError
from dtk.runtime.sidecar import (
    PlanSidecar,
    Target,
    check_plan_bytes,
    check_sidecar,
    compatibility_problems,
    current_target,
    load_sidecar,
    sidecar_path,
    tensorrt_accepts,
)

ORIN = Target("10.3.0", "Orin", (8, 7))


def _sidecar(**changes) -> PlanSidecar:
    fields = {
        "tensorrt_version": "10.3.0",
        "gpu_name": "Orin",
        "compute_capability": (8, 7),
        "precision": "fp16",
        "profiles": [{"sample": {"min": [1, 3, 32, 32], "opt": [4, 3, 32, 32], "max": [8, 3, 32, 32]}}],
        "onnx_sha256": "ab" * 32,
        "plan_sha256": hashlib.sha256(b"plan").hexdigest(),
    }
    return PlanSidecar(**{**fields, **changes})


def test_save_and_load_round_trip(tmp_path):
    plan = tmp_path / "unet.plan"
    written = _sidecar(hardware_compat="ampere+", version_compat=True, build={"workspace": 512})
    assert written.save(plan) == tmp_path / "unet.plan.json" == sidecar_path(plan)
    assert load_sidecar(plan) == written
    assert json.loads((tmp_path / "unet.plan.json").read_text())["schema"] == "dtk.plan"


def test_missing_sidecar_says_to_rebuild(tmp_path):
    with pytest.raises(DtkError, match=r"unet.plan: has no sidecar unet.plan.json.*`dtk build-engine "):
        load_sidecar(tmp_path / "unet.plan")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "not valid JSON"),
        ('{"schema": "dtk.bundle", "schema_version": 1}', "not a dtk plan sidecar"),
        ('{"schema": "dtk.plan", "schema_version": 99}', "schema version 99 is newer than this dtk reads"),
        ('{"schema": "dtk.plan", "schema_version": 1, "gpu_name": "Orin"}', "malformed sidecar"),
    ],
)
def test_broken_sidecars_are_refused(tmp_path, content, problem):
    (tmp_path / "unet.plan.json").write_text(content)
    with pytest.raises(DtkError, match=problem):
        load_sidecar(tmp_path / "unet.plan")


def test_bad_field_values_are_refused(tmp_path):
    for change, problem in (
        ({"precision": "int4"}, "unknown precision"),
        ({"hardware_compat": "all"}, "unknown"),
    ):
        data = {**_sidecar().to_dict(), **change}
        (tmp_path / "unet.plan.json").write_text(json.dumps(data))
        with pytest.raises(DtkError, match=problem):
            load_sidecar(tmp_path / "unet.plan")


def test_the_machine_it_was_built_on_may_run_it():
    assert compatibility_problems(_sidecar(), ORIN) == []


def test_another_tensorrt_version_is_refused_with_a_rebuild_hint(tmp_path):
    plan = tmp_path / "bundle" / "unet.plan"
    with pytest.raises(DtkError) as caught:
        check_sidecar(_sidecar(), Target("10.4.0", "Orin", (8, 7)), plan)
    assert str(caught.value) == (
        f"{plan}: built with TensorRT 10.3.0, this machine has TensorRT 10.4.0; "
        f"rebuild it on the target with `dtk build-engine {tmp_path / 'bundle'}`"
    )


def test_another_gpu_is_refused_naming_both():
    (problem,) = compatibility_problems(_sidecar(), Target("10.3.0", "NVIDIA H200", (9, 0)))
    assert problem == "built for Orin (sm_87), this GPU is NVIDIA H200 (sm_90)"
    (problem,) = compatibility_problems(_sidecar(gpu_name="NVIDIA RTX A6000", compute_capability=(8, 6)),
                                        Target("10.3.0", "NVIDIA GeForce RTX 3090", (8, 6)))  # fmt: skip
    assert "same sm_86" in problem and "one GPU model" in problem


def test_both_differences_are_reported_at_once():
    problems = compatibility_problems(_sidecar(), Target("11.0.0", "NVIDIA H200", (9, 0)))
    assert len(problems) == 2


def test_hardware_compatible_plans_run_on_ampere_and_newer():
    sidecar = _sidecar(hardware_compat="ampere+", gpu_name="NVIDIA A100", compute_capability=(8, 0))
    assert compatibility_problems(sidecar, Target("10.3.0", "NVIDIA H200", (9, 0))) == []
    assert compatibility_problems(sidecar, Target("10.3.0", "NVIDIA GeForce RTX 3060", (8, 6))) == []
    (problem,) = compatibility_problems(sidecar, Target("10.3.0", "Tesla T4", (7, 5)))
    assert "Ampere and newer" in problem and "sm_75" in problem


@pytest.mark.parametrize(
    ("built", "running", "compat", "accepted"),
    [
        ("10.3.0", "10.3.0", False, True),
        ("10.3.0", "10.3.0.30", False, False),  # not the same build
        ("10.3.0", "10.7.0", False, False),
        ("10.3.0", "10.7.0", True, True),  # version-compatible: later 10.x
        ("10.3.0", "10.2.0", True, False),  # never older
        ("10.3.0", "11.1.0", True, True),  # 10 → 11 is supported
        ("8.6.1", "10.0.1", True, True),  # 8 → 10 too
        ("10.3.0", "12.0.0", True, False),
        ("11.2.0", "11.10.1", True, True),  # numeric, not string, comparison
        ("11.10.1", "11.2.0", True, False),
    ],
)
def test_tensorrt_version_rules(built, running, compat, accepted):
    assert tensorrt_accepts(built, running, compat) is accepted


def test_version_compatible_plan_passes_the_check(tmp_path):
    check_sidecar(_sidecar(version_compat=True), Target("11.0.0", "Orin", (8, 7)), tmp_path / "unet.plan")


def test_plan_bytes_must_be_the_ones_the_sidecar_describes(tmp_path):
    check_plan_bytes(_sidecar(), b"plan", tmp_path / "unet.plan")
    with pytest.raises(DtkError, match=r"does not match its sidecar .*dtk build-engine"):
        check_plan_bytes(_sidecar(), b"another plan", tmp_path / "unet.plan")


def test_current_target_without_tensorrt_says_how_to_get_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(DtkError, match=r"TensorRT is not installed .*pip install dtk\[tensorrt\].*JetPack 6"):
        current_target()


def test_a_gpu_is_its_name_compute_capability_and_sm_count():
    """Orin modules share one name: the SM count tells an Orin NX 8 GB plan from an AGX Orin's."""
    sidecar = _sidecar(gpu_name="Orin", sm_count=8, integrated=True, platform="linux_aarch64")
    same = Target("10.3.0", "Orin", (8, 7), 8, True, "linux_aarch64")
    agx = Target("10.3.0", "Orin", (8, 7), 16, True, "linux_aarch64")
    assert compatibility_problems(sidecar, same) == []
    (problem,) = compatibility_problems(sidecar, agx)
    assert "built on Orin with 8 SMs, this one has 16" in problem
    assert compatibility_problems(_sidecar(), agx) == []  # schema-1 sidecars carry no SM count


def test_hardware_compatible_plans_are_refused_on_jetson_and_across_platforms():
    built = _sidecar(
        hardware_compat="ampere+", gpu_name="NVIDIA A100", compute_capability=(8, 0), sm_count=108,
        integrated=False, platform="linux_x86_64",
    )  # fmt: skip
    (problem,) = compatibility_problems(built, Target("10.3.0", "Orin", (8, 7), 16, True, "linux_x86_64"))
    assert "not support on integrated GPUs such as Orin (Jetson)" in problem
    (problem,) = compatibility_problems(
        built, Target("10.3.0", "NVIDIA GH200", (9, 0), 132, False, "linux_aarch64")
    )
    assert problem == "built on linux_x86_64, this machine is linux_aarch64"
    assert (
        compatibility_problems(built, Target("10.3.0", "NVIDIA H200", (9, 0), 132, False, "linux_x86_64"))
        == []
    )
    from_jetson = _sidecar(hardware_compat="ampere+", integrated=True)
    (problem,) = compatibility_problems(from_jetson, Target("10.3.0", "NVIDIA H200", (9, 0), 132, False))
    assert "integrated GPUs such as Orin" in problem


def test_schema_2_fields_round_trip_and_schema_1_still_loads(tmp_path):
    plan = tmp_path / "unet.plan"
    sidecar = _sidecar(
        architecture="Ampere", integrated=True, sm_count=8, platform="linux_aarch64",
        parity={"passed": True, "cases": []},
    )  # fmt: skip
    sidecar.save(plan)
    data = json.loads(sidecar_path(plan).read_text())
    assert data["schema_version"] == 2 and data["sm_count"] == 8 and data["integrated"] is True
    assert load_sidecar(plan) == sidecar
    old = {
        k: v
        for k, v in data.items()
        if k not in ("architecture", "integrated", "sm_count", "platform", "parity")
    }
    sidecar_path(plan).write_text(json.dumps({**old, "schema_version": 1}))
    loaded = load_sidecar(plan)
    assert (loaded.sm_count, loaded.integrated, loaded.platform, loaded.parity) == (None, None, "", {})


def test_the_engine_matching_this_machine_is_picked_and_named(tmp_path):
    from dtk.runtime.sidecar import bundle_plans, pick_plan

    for name, gpu, cc in (("unet.plan", "NVIDIA H200", (9, 0)), ("unet-orin-nx-fp16.plan", "Orin", (8, 7))):
        (tmp_path / name).write_bytes(b"plan")
        _sidecar(gpu_name=gpu, compute_capability=cc).save(tmp_path / name)
    (tmp_path / "unet-stray.plan").write_bytes(b"no sidecar")
    plans = bundle_plans(tmp_path, "unet.plan")
    assert [p.name for p in plans] == ["unet.plan", "unet-orin-nx-fp16.plan"]
    plan, line = pick_plan(plans, ORIN)
    assert plan.name == "unet-orin-nx-fp16.plan"
    assert line == "using engine unet-orin-nx-fp16.plan of 2: built for Orin (sm_87), fp16, TensorRT 10.3.0"
    with pytest.raises(
        DtkError, match=r"no engine here runs on this machine \(unet\.plan: built for NVIDIA H200"
    ):
        pick_plan(plans, Target("10.3.0", "Tesla T4", (7, 5)))
