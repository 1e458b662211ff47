"""Training-side diffusion: the schedule is dtk.runtime's, q_sample and targets match diffusers, losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dtk.diffusion import NoiseSchedule, diffusion_loss
from dtk.runtime.errors import DtkError
from dtk.runtime.schedule import DiffusionConfig

pytestmark = pytest.mark.usefixtures("single_thread")


def test_schedule_is_the_runtime_one_as_float32():
    config = DiffusionConfig(beta_schedule="cosine")
    schedule = NoiseSchedule(config)
    assert schedule.alphas_cumprod.dtype == torch.float32
    np.testing.assert_array_equal(schedule.alphas_cumprod.numpy(), config.alphas_cumprod.astype(np.float32))


def test_q_sample_pinned_values_linear():
    schedule = NoiseSchedule(DiffusionConfig())
    x0, noise = torch.ones(2, 1, 2, 2), torch.full((2, 1, 2, 2), 2.0)
    x_t = schedule.q_sample(x0, torch.tensor([0, 999]), noise)
    # ᾱ_0 = 1 − 1e-4;  ᾱ_999 = Π(1 − β) over the linear 1e-4..0.02 schedule = 4.0358e-5
    assert x_t[0, 0, 0, 0].item() == pytest.approx(0.9999**0.5 + 2 * 0.0001**0.5, abs=1e-6)
    assert x_t[1, 0, 0, 0].item() == pytest.approx(4.0358e-5**0.5 + 2 * (1 - 4.0358e-5) ** 0.5, abs=1e-5)


@pytest.mark.parametrize("beta_schedule", ["linear", "cosine"])
def test_q_sample_and_v_target_match_diffusers(beta_schedule):
    diffusers = pytest.importorskip("diffusers")
    config = DiffusionConfig(beta_schedule=beta_schedule, prediction_type="v_prediction")
    reference = diffusers.DDPMScheduler(**config.to_diffusers())
    schedule = NoiseSchedule(config)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 17, 500, 999])
    torch.testing.assert_close(
        schedule.q_sample(x0, t, noise), reference.add_noise(x0, noise, t), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        schedule.target(x0, t, noise), reference.get_velocity(x0, noise, t), atol=1e-5, rtol=0
    )


def test_targets_per_prediction_type():
    x0, noise, t = torch.randn(2, 1, 3, 3), torch.randn(2, 1, 3, 3), torch.tensor([5, 600])
    assert torch.equal(NoiseSchedule(DiffusionConfig()).target(x0, t, noise), noise)
    assert torch.equal(NoiseSchedule(DiffusionConfig(prediction_type="sample")).target(x0, t, noise), x0)


class _Oracle(torch.nn.Module):
    """Predicts exactly the training target (it is told x0 and ε), so the loss must be zero."""

    def __init__(self, schedule, x0, noise):
        super().__init__()
        self.schedule, self.x0, self.noise = schedule, x0, noise

    def forward(self, x_t, t):
        return self.schedule.target(self.x0, t, self.noise)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_is_zero_for_a_perfect_model_and_mse_otherwise(prediction_type):
    schedule = NoiseSchedule(DiffusionConfig(prediction_type=prediction_type))
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    t = torch.tensor([1, 400, 900])
    assert diffusion_loss(_Oracle(schedule, x0, noise), schedule, x0, t, noise).item() == 0.0
    zero = diffusion_loss(lambda x, t: torch.zeros_like(x), schedule, x0, t, noise)
    assert zero.item() == pytest.approx(schedule.target(x0, t, noise).pow(2).mean().item(), rel=1e-6)


def test_min_snr_weights():
    schedule = NoiseSchedule(DiffusionConfig())
    t = torch.tensor([10, 500, 999])
    snr = schedule.snr(t)
    # linear schedule: SNR falls from ~1e3 at t=10 to ~4e-5 at t=999
    assert snr[0].item() == pytest.approx(0.9978066 / (1 - 0.9978066), rel=1e-4)
    eps = schedule.min_snr_weight(t, 5.0)
    torch.testing.assert_close(eps, torch.stack([5.0 / snr[0], torch.tensor(1.0), torch.tensor(1.0)]))
    x0 = NoiseSchedule(DiffusionConfig(prediction_type="sample")).min_snr_weight(t, 5.0)
    torch.testing.assert_close(x0, torch.stack([torch.tensor(5.0), snr[1], snr[2]]))
    v = NoiseSchedule(DiffusionConfig(prediction_type="v_prediction")).min_snr_weight(t, 5.0)
    torch.testing.assert_close(
        v, torch.stack([5.0 / (snr[0] + 1), snr[1] / (snr[1] + 1), snr[2] / (snr[2] + 1)])
    )


def test_min_snr_loss_weights_each_image():
    schedule = NoiseSchedule(DiffusionConfig())
    x0, noise = torch.zeros(2, 1, 2, 2), torch.ones(2, 1, 2, 2)
    t = torch.tensor([10, 999])
    plain = diffusion_loss(lambda x, t: torch.zeros_like(x), schedule, x0, t, noise)
    weighted = diffusion_loss(lambda x, t: torch.zeros_like(x), schedule, x0, t, noise, min_snr_gamma=5.0)
    assert plain.item() == pytest.approx(1.0)
    assert weighted.item() == pytest.approx(schedule.min_snr_weight(t, 5.0).mean().item())


def test_loss_refuses_bad_inputs():
    schedule = NoiseSchedule(DiffusionConfig())
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(DtkError, match="loss inputs disagree"):
        diffusion_loss(lambda x, t: x, schedule, x0, torch.tensor([1, 2, 3]), x0)
    with pytest.raises(DtkError, match="min_snr_gamma must be positive"):
        diffusion_loss(lambda x, t: x, schedule, x0, torch.tensor([1, 2]), x0, min_snr_gamma=0.0)
