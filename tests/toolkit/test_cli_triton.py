"""`dtk triton BUNDLE REPO` and `dtk serve`'s flags: both models, defaults recorded, bad input in one line."""

from __future__ import annotations

from dtk.cli import main


def test_triton_writes_both_models(tiny_bundle, tmp_path, capsys):
    repo = tmp_path / "repo"
    args = ["triton", str(tiny_bundle), str(repo), "--kind", "cpu", "--instances", "2"]
    assert main([*args, "--serve-steps", "30", "--serve-sampler", "dpmpp-2m"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        f"wrote Triton model {repo / 'dtk_sampler'}",
        f"wrote Triton model {repo / 'dtk_unet'}",
    ]
    sampler = (repo / "dtk_sampler" / "config.pbtxt").read_text()
    assert 'string_value: "30"' in sampler and 'string_value: "dpmpp-2m"' in sampler
    assert "count: 2" in sampler and "KIND_CPU" in sampler
    assert (repo / "dtk_sampler" / "1" / "bundle" / "unet.onnx").is_file()
    assert 'platform: "onnxruntime_onnx"' in (repo / "dtk_unet" / "config.pbtxt").read_text()


def test_triton_bad_input_is_one_line(tiny_bundle, tmp_path, capsys):
    assert main(["triton", str(tmp_path / "missing"), str(tmp_path / "repo")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and not (tmp_path / "repo").exists()
    assert main(["triton", str(tiny_bundle), str(tmp_path / "repo"), "--serve-steps", "5000"]) == 1
    assert "steps must be between 1 and num_train_timesteps (1000), got 5000" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "dtk_sampler").exists()


def test_serve_and_triton_flags_have_help():
    from dtk.cli import serve, triton

    for command in (serve.command, triton.command):
        for param in command.params:
            if param.param_type_name == "option":
                assert param.help, f"{command.name} {param.name} has no help text"
