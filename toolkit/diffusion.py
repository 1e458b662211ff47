"""Training-side diffusion (torch): the forward process q(x_t | x_0) and the denoising loss.

The schedule comes from `dtk.runtime.schedule` (numpy, float64), the one definition shared with every sampler;
here it is only converted to tensors.
"""

from __future__ import annotations

import torch

from dtk.runtime.errors import DtkError
from dtk.runtime.schedule import DiffusionConfig


class NoiseSchedule:
    """ᾱ_t of a `DiffusionConfig` as float32 tensors on one device, with the closed-form forward process."""

    def __init__(self, config: DiffusionConfig, device: torch.device | str = "cpu"):
        self.config = config
        alphas_cumprod = torch.from_numpy(config.alphas_cumprod)  # float64 from the runtime
        self.alphas_cumprod = alphas_cumprod.to(device=device, dtype=torch.float32)
        self.sqrt_alphas_cumprod = alphas_cumprod.sqrt().to(device=device, dtype=torch.float32)
        self.sqrt_one_minus_alphas_cumprod = (
            (1.0 - alphas_cumprod).sqrt().to(device=device, dtype=torch.float32)
        )

    @property
    def num_train_timesteps(self) -> int:
        return self.config.num_train_timesteps

    def _at(self, values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
        return values[t].reshape(-1, *([1] * (ndim - 1)))  # (B, 1, 1, 1)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1−ᾱ_t) ε  (Ho et al. 2020, eq. 4)."""
        return (
            self._at(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
            + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
        )

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The training target: ε, v = √ᾱ_t ε − √(1−ᾱ_t) x_0 (Salimans & Ho 2022), or x_0."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return (
                self._at(self.sqrt_alphas_cumprod, t, x0.ndim) * noise
                - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * x0
            )
        return x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t)."""
        alpha_bar = self.alphas_cumprod[t]
        return alpha_bar / (1.0 - alpha_bar)

    def min_snr_weight(self, t: torch.Tensor, gamma: float) -> torch.Tensor:
        """Min-SNR-γ loss weights (Hang et al. 2023), expressed for the prediction target in use.

        The x_0-space weight is min(SNR, γ); an ε loss is SNR times an x_0 loss, a v loss (SNR + 1) times."""
        snr = self.snr(t)
        clipped = snr.clamp(max=gamma)
        kind = self.config.prediction_type
        if kind == "epsilon":
            return clipped / snr
        if kind == "v_prediction":
            return clipped / (snr + 1.0)
        return clipped


def diffusion_loss(
    model,
    schedule: NoiseSchedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    min_snr_gamma: float | None = None,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """The simple DDPM objective: mean squared error between the model output on x_t and the target.

    With `min_snr_gamma` each image's error is weighted by its Min-SNR-γ weight; `class_labels` [B] go to a
    class-conditional model."""
    if x0.shape != noise.shape or t.shape != (x0.shape[0],):
        raise DtkError(
            f"loss inputs disagree: x0 {tuple(x0.shape)}, noise {tuple(noise.shape)}, t {tuple(t.shape)}"
        )
    x_t = schedule.q_sample(x0, t, noise)
    prediction = model(x_t, t) if class_labels is None else model(x_t, t, class_labels)
    target = schedule.target(x0, t, noise)
    per_image = (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)  # (B,)
    if min_snr_gamma is not None:
        if min_snr_gamma <= 0:
            raise DtkError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        per_image = per_image * schedule.min_snr_weight(t, min_snr_gamma)
    return per_image.mean()
