"""The DDPM U-Net (Ho et al. 2020): ResBlocks with a timestep embedding, self-attention, skip connections.

Layout as in the paper's code (and diffusers' UNet2DModel): per resolution level `num_res_blocks` ResBlocks
going down and `num_res_blocks + 1` coming up, attention after each block at the chosen resolutions,
attention in the middle, stride-2 convolutions down and nearest-neighbour upsampling + convolution up.
Everything is plain tensor ops with shape-only control flow, so the model traces to ONNX.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dtk.runtime.errors import DtkError

# name -> UNetConfig fields; image size and channels are usually overridden from the data
PRESETS = {
    # ~0.7M parameters: learns 16x16 digits in a few CPU minutes
    "tiny": dict(
        image_size=16,
        in_channels=3,
        out_channels=3,
        base_channels=16,
        channel_mults=(1, 2, 4),
        num_res_blocks=1,
        attention_resolutions=(4,),
        dropout=0.0,
        num_heads=1,
        num_groups=8,
    ),
    # ~6.6M parameters on 32x32: the same shape as ddpm-cifar10 at half the width and one block per level
    "small": dict(
        image_size=32,
        in_channels=3,
        out_channels=3,
        base_channels=64,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
        dropout=0.1,
        num_heads=1,
        num_groups=32,
    ),
    # Ho et al. 2020, CIFAR-10: 35,746,307 parameters
    "ddpm-cifar10": dict(
        image_size=32,
        in_channels=3,
        out_channels=3,
        base_channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(16,),
        dropout=0.1,
        num_heads=1,
        num_groups=32,
    ),
}


@dataclass(frozen=True)
class UNetConfig:
    """The U-Net's shape. `attention_resolutions` are feature-map sizes in pixels (16: the 16x16 level); sizes
    that are not a level of this U-Net add no attention (the middle always has one)."""

    image_size: int
    in_channels: int
    out_channels: int
    base_channels: int
    channel_mults: tuple
    num_res_blocks: int
    attention_resolutions: tuple
    dropout: float
    num_heads: int
    num_groups: int = 32
    num_class_embeds: int | None = None  # class-conditional: embeddings, the null class included

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(int(m) for m in self.channel_mults))
        object.__setattr__(self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions))
        self.validate()

    def validate(self) -> None:
        positive = ("image_size", "in_channels", "out_channels", "base_channels", "num_heads", "num_groups")
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise DtkError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.num_class_embeds is not None and self.num_class_embeds < 2:
            raise DtkError(
                f"num_class_embeds must be at least 2 (classes and the null class), "
                f"got {self.num_class_embeds}"
            )
        if self.num_res_blocks < 1:
            raise DtkError(f"num_res_blocks must be at least 1, got {self.num_res_blocks}")
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise DtkError(f"channel_mults must be positive integers, got {self.channel_mults}")
        if not 0.0 <= self.dropout < 1.0:
            raise DtkError(f"dropout must be in [0, 1), got {self.dropout}")
        factor = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % factor:
            raise DtkError(
                f"image size {self.image_size} is not divisible by {factor}: with {len(self.channel_mults)} "
                f"levels (channel_mults {','.join(map(str, self.channel_mults))}) it is halved "
                f"{len(self.channel_mults) - 1} times"
            )
        for width in sorted({self.base_channels * m for m in self.channel_mults}):
            if width % self.num_groups:
                raise DtkError(f"{width} channels cannot be split into {self.num_groups} GroupNorm groups")
            if width % self.num_heads:
                raise DtkError(f"{width} channels cannot be split into {self.num_heads} attention heads")

    @property
    def resolutions(self) -> tuple:
        """Feature-map size at each level, from the input down."""
        return tuple(self.image_size // 2**i for i in range(len(self.channel_mults)))

    @classmethod
    def preset(cls, name: str, **overrides) -> UNetConfig:
        if name not in PRESETS:
            raise DtkError(f"unknown U-Net preset {name!r}; choose one of {', '.join(PRESETS)}")
        fields = dict(PRESETS[name])
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["num_class_embeds"] is None:  # an unconditional config reads as it always did
            del data["num_class_embeds"]
        data["channel_mults"] = list(self.channel_mults)
        data["attention_resolutions"] = list(self.attention_resolutions)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DtkError(f"unknown U-Net config field(s): {', '.join(unknown)}")
        return cls(**data)


def timestep_embedding(timestep: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, [B] -> [B, dim], as in DDPM."""
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timestep.device) * (
        -math.log(max_period) / half
    )
    angles = timestep.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    """DDPM initialises the last layer of each residual branch to zero: every block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm → SiLU → conv, + projected time embedding, GroupNorm → SiLU → dropout → conv, + skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, with a residual connection."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = _zero(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).reshape(b, h * w, 3, self.num_heads, c // self.num_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, HW, C/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(b, h * w, c)  # (B, HW, C)
        return x + self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The blocks of one resolution level (down or up path), with the optional attention after each block."""

    def __init__(self, blocks: list, attentions: list, resample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attentions = nn.ModuleList(attentions)  # empty, or one per block
        self.resample = resample


class UNet(nn.Module):
    """`forward(sample [B, C, H, W], timestep [B], class_labels [B] | None) -> [B, out_channels, H, W]`.

    With `num_class_embeds` a learned class embedding is added to the timestep embedding (diffusers'
    UNet2DModel with `class_embed_type=None`); the last class is the null class, used when `class_labels` is
    None, so classifier-free guidance (Ho & Salimans 2022) can ask the same network for an unconditional
    prediction."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        base, groups = c.base_channels, c.num_groups
        temb_ch = 4 * base
        widths = [base * m for m in c.channel_mults]
        last = len(widths) - 1

        def attention(res: int, ch: int) -> list:
            return [Attention(ch, c.num_heads, groups)] if res in c.attention_resolutions else []

        self.temb = nn.Sequential(nn.Linear(base, temb_ch), nn.SiLU(), nn.Linear(temb_ch, temb_ch))
        if c.num_class_embeds is not None:
            self.class_embedding = nn.Embedding(c.num_class_embeds, temb_ch)
        self.conv_in = nn.Conv2d(c.in_channels, base, 3, padding=1)

        skips, ch = [base], base
        self.down = nn.ModuleList()
        for i, (res, width) in enumerate(zip(c.resolutions, widths, strict=True)):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(ch, width, temb_ch, c.dropout, groups))
                attns += attention(res, width)
                ch = width
                skips.append(ch)
            down = Downsample(ch) if i < last else None
            if down is not None:
                skips.append(ch)
            self.down.append(Level(blocks, attns, down))

        self.mid_block1 = ResBlock(ch, ch, temb_ch, c.dropout, groups)
        self.mid_attention = Attention(ch, c.num_heads, groups)
        self.mid_block2 = ResBlock(ch, ch, temb_ch, c.dropout, groups)

        self.up = nn.ModuleList()
        for i in reversed(range(len(widths))):
            res, width = c.resolutions[i], widths[i]
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(ch + skips.pop(), width, temb_ch, c.dropout, groups))
                attns += attention(res, width)
                ch = width
            self.up.append(Level(blocks, attns, Upsample(ch) if i > 0 else None))

        self.norm_out = nn.GroupNorm(groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, c.out_channels, 3, padding=1))

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        timestep = timestep.reshape(-1).expand(sample.shape[0])  # a scalar t applies to the whole batch
        temb = self.temb(timestep_embedding(timestep, self.config.base_channels))  # (B, 4*base)
        if self.config.num_class_embeds is not None:
            temb = temb + self.class_embedding(self._labels(class_labels, sample))
        elif class_labels is not None:
            raise DtkError("class_labels given to an unconditional U-Net (num_class_embeds is not set)")

        h = self.conv_in(sample)
        skips = [h]
        for level in self.down:
            for j, block in enumerate(level.blocks):
                h = block(h, temb)
                if len(level.attentions):
                    h = level.attentions[j](h)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)
                skips.append(h)

        h = self.mid_block2(self.mid_attention(self.mid_block1(h, temb)), temb)

        for level in self.up:
            for j, block in enumerate(level.blocks):
                h = block(torch.cat([h, skips.pop()], dim=1), temb)
                if len(level.attentions):
                    h = level.attentions[j](h)
            if level.resample is not None:
                h = level.resample(h)

        return self.conv_out(F.silu(self.norm_out(h)))

    def _labels(self, class_labels, sample: torch.Tensor) -> torch.Tensor:
        """int64 [B]: the given labels (a scalar applies to the whole batch), or the null class."""
        if class_labels is None:
            class_labels = torch.tensor(self.config.num_class_embeds - 1, device=sample.device)
        if not torch.is_tensor(class_labels):
            class_labels = torch.tensor(class_labels, device=sample.device)
        return class_labels.long().reshape(-1).expand(sample.shape[0])


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
