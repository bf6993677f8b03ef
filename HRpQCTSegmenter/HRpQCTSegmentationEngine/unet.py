"""A plain 2D U-Net baseline of SegFormer-B0 size, for the paper's CNN comparison.

Same input (one channel in [0, 1]) and outputs (the six network classes) as the SegFormer, but
logits at full input resolution. Configuration is data (:class:`UNetConfig`), stored next to the
weights like SegFormer's ``config.json``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from HRpQCTCore.regions import NETWORK_CLASSES

__all__ = ["UNetConfig", "UNet"]


@dataclass(frozen=True)
class UNetConfig:
    """U-Net hyper-parameters. Defaults give ~3.7 M parameters (MiT-B0 SegFormer: 3.7 M)."""

    num_channels: int = 1
    num_labels: int = len(NETWORK_CLASSES)
    base_channels: int = 22
    depth: int = 4  # number of 2x downsamplings

    def to_dict(self) -> dict:
        return {"model_type": "unet", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> UNetConfig:
        fields = {k: data[k] for k in ("num_channels", "num_labels", "base_channels", "depth")
                  if k in data}
        return cls(**fields)


def _double_conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Encoder-decoder with skip connections (Ronneberger et al. 2015), batch-normalised."""

    def __init__(self, config: UNetConfig | None = None) -> None:
        super().__init__()
        self.config = config or UNetConfig()
        c = self.config.base_channels
        widths = [c * 2**i for i in range(self.config.depth + 1)]
        self.down = nn.ModuleList()
        c_prev = self.config.num_channels
        for w in widths:
            self.down.append(_double_conv(c_prev, w))
            c_prev = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.up_conv = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(nn.ConvTranspose2d(c_prev, w, 2, stride=2))
            self.up_conv.append(_double_conv(2 * w, w))
            c_prev = w
        self.classifier = nn.Conv2d(c_prev, self.config.num_labels, 1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return logits ``[B, num_labels, H, W]``; H and W must be divisible by 2**depth."""
        factor = 2**self.config.depth
        h, w = pixel_values.shape[-2:]
        if h % factor or w % factor:
            raise ValueError(f"U-Net input {h}x{w} must be divisible by {factor}")
        skips = []
        x = pixel_values
        for i, block in enumerate(self.down):
            x = block(x)
            if i < len(self.down) - 1:
                skips.append(x)
                x = self.pool(x)
        for up, conv, skip in zip(self.up, self.up_conv, reversed(skips), strict=True):
            x = conv(torch.cat([up(x), skip], dim=1))
        return self.classifier(x)
