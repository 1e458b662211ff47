"""model.pt: round trip, describe, and refusing files that are not checkpoints, are truncated or run code."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from dtk.checkpoint import FORMAT, Checkpoint, describe_checkpoint, load_checkpoint, save_checkpoint
from dtk.runtime.errors import DtkError
from dtk.runtime.schedule import DiffusionConfig
from dtk.unet import UNet, UNetConfig, count_parameters

pytestmark = pytest.mark.usefixtures("single_thread")


def _checkpoint(ema: bool = True) -> Checkpoint:
    torch.manual_seed(0)
    config = UNetConfig.preset("tiny", image_size=8, in_channels=1, out_channels=1, base_channels=8)
    raw = {k: v.clone() for k, v in UNet(config).state_dict().items()}
    ema_state = {k: v + 0.5 for k, v in raw.items()} if ema else None
    return Checkpoint(
        model_config=config,
        diffusion=DiffusionConfig(beta_schedule="cosine", prediction_type="v_prediction"),
        model_state=raw,
        ema_state=ema_state,
        step=123,
        train_state={"ema_updates": 123, "config": {"lr": 0.002, "steps": 500}},
    )


def test_round_trip(tmp_path):
    ckpt = _checkpoint()
    path = save_checkpoint(tmp_path / "run" / "model.pt", ckpt)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary file left behind
    loaded = load_checkpoint(path)
    assert loaded.path == path and loaded.step == 123
    assert loaded.model_config == ckpt.model_config and loaded.diffusion == ckpt.diffusion
    assert loaded.train_state == ckpt.train_state
    for name, tensor in ckpt.model_state.items():
        assert torch.equal(loaded.model_state[name], tensor)
        assert torch.equal(loaded.ema_state[name], ckpt.ema_state[name])


def test_build_model_picks_ema_or_raw_weights(tmp_path):
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "model.pt", _checkpoint()))
    ema, raw = ckpt.build_model(), ckpt.build_model("raw")
    assert not ema.training and next(ema.parameters()).device.type == "cpu"
    assert torch.equal(ema.conv_in.weight, ckpt.model_state["conv_in.weight"] + 0.5)
    assert torch.equal(raw.conv_in.weight, ckpt.model_state["conv_in.weight"])
    no_ema = _checkpoint(ema=False)
    assert torch.equal(no_ema.build_model("ema").conv_in.weight, no_ema.model_state["conv_in.weight"])
    with pytest.raises(DtkError, match="weights must be 'ema' or 'raw'"):
        ckpt.build_model("best")


def test_weights_that_do_not_fit_the_config(tmp_path):
    ckpt = _checkpoint()
    del ckpt.model_state["conv_in.weight"]
    ckpt.ema_state = None
    loaded = load_checkpoint(save_checkpoint(tmp_path / "model.pt", ckpt))
    with pytest.raises(
        DtkError, match=r"model.pt: weights do not match the U-Net config \(missing conv_in.weight"
    ):
        loaded.build_model()


def test_describe(tmp_path):
    ckpt = load_checkpoint(save_checkpoint(tmp_path / "model.pt", _checkpoint()))
    info = describe_checkpoint(ckpt)
    assert info["parameters"] == count_parameters(ckpt.build_model()) == 163_705
    assert info["step"] == 123 and info["image_shape"] == [1, 8, 8]
    assert info["prediction_type"] == "v_prediction" and info["weights"] == ["raw", "ema"]
    assert info["schedule"]["beta_schedule"] == "cosine" and info["schedule"]["num_train_timesteps"] == 1000
    assert info["schedule"]["beta_last"] == pytest.approx(0.999)  # the cosine cap
    assert info["model"]["channel_mults"] == [1, 2, 4] and info["training"] == {"lr": 0.002, "steps": 500}
    assert info["resumable"] is True and info["path"] == str(tmp_path / "model.pt")


class _RunsCode:
    """Unpickling this calls os.system: the payload of a malicious checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "version": 1, "payload": _RunsCode(marker)}, path)
    with pytest.raises(DtkError, match=r"evil.pt: refused to load: its pickle imports posix.system"):
        load_checkpoint(path)
    assert not marker.exists()


def test_plain_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({"payload": _RunsCode(marker)}, f, protocol=2)
    with pytest.raises(
        DtkError, match=r"evil.pkl: refused to load: its pickle imports posix.system, which could run"
    ):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_checkpoint(tmp_path):
    path = save_checkpoint(tmp_path / "model.pt", _checkpoint())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DtkError, match=r"model.pt: truncated or corrupt checkpoint"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"hello, I am a text file\n", "not a dtk checkpoint"),
        (b"", "empty file, not a dtk checkpoint"),
        (pickle.dumps([1, 2, 3]), "not a dtk checkpoint"),
    ],
)
def test_files_that_are_not_checkpoints(tmp_path, content, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(DtkError, match=f"model.pt: {message}"):
        load_checkpoint(path)


def test_torch_files_that_are_not_dtk_checkpoints(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.ones(2)}, path)
    with pytest.raises(
        DtkError, match="weights.pt: not a dtk checkpoint: no 'dtk.checkpoint' format marker .*state_dict"
    ):
        load_checkpoint(path)
    torch.save({**_checkpoint().to_dict(), "version": 99}, path)
    with pytest.raises(DtkError, match="checkpoint version 99 is not supported by this dtk"):
        load_checkpoint(path)
    damaged = _checkpoint().to_dict()
    del damaged["model_config"]
    torch.save(damaged, path)
    with pytest.raises(DtkError, match="damaged dtk checkpoint: missing 'model_config'"):
        load_checkpoint(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DtkError, match="nothing.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nothing.pt")
    with pytest.raises(DtkError, match="is a directory"):
        load_checkpoint(tmp_path)
