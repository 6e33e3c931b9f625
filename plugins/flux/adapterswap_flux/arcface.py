"""The ArcFace recognition network InfiniteYou conditions on: IR-SE50, as facexlib ships it.

InfiniteYou embeds the aligned face with facexlib's ``init_recognition_model('arcface')``: an
IR-SE50 ResNet (``recognition_arcface_ir_se50.pth``) whose 512-d output is L2-normalised. The
network is written here with facexlib's exact module names, so that file loads with
``load_state_dict(strict=True)``, and with its widths and depths read back from the state dict,
so the same loader also builds the tiny random version the tests and ``--preset tiny`` use.

Layout (facexlib's key names)::

    input_layer   = Conv(3->C0, 3x3) . BN . PReLU
    body.N        = bottleneck_IR_SE: shortcut_layer (MaxPool(1, s) or Conv 1x1 s . BN)
                    res_layer = BN . Conv 3x3 . PReLU . Conv 3x3 s . BN . SE(fc1, fc2)
    output_layer  = BN2d . Dropout . Flatten . Linear(C*7*7 -> E) . BN1d, then L2-normalise

A unit strides by 2 when it opens a stage: the first unit, and every unit that changes the
width (those have a convolution shortcut). Four such units take 112 px to the 7x7 map.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

#: facexlib's published weights (InfiniteYou downloads them through facexlib on first use).
ARCFACE_FILENAME = "recognition_arcface_ir_se50.pth"
ARCFACE_URL = (
    "https://github.com/xinntao/facexlib/releases/download/v0.1.0/" + ARCFACE_FILENAME
)


@dataclass(frozen=True)
class IRSEConfig:
    """Widths and depths of an IR-SE network.

    :ivar stem: channels of ``input_layer``.
    :ivar units: ``(in_channels, depth)`` of every ``body`` unit, in order.
    :ivar embedding_dim: size of the output embedding (512 for ArcFace).
    :ivar se_reduction: squeeze-excitation reduction (16 in IR-SE50).
    """

    stem: int
    units: tuple[tuple[int, int], ...]
    embedding_dim: int
    se_reduction: int = 16

    @classmethod
    def ir_se50(cls) -> IRSEConfig:
        """facexlib's ``Backbone(num_layers=50, mode='ir_se')``: 3, 4, 14, 3 units."""
        units: list[tuple[int, int]] = []
        for in_channels, depth, count in ((64, 64, 3), (64, 128, 4), (128, 256, 14),
                                          (256, 512, 3)):
            units += [(in_channels, depth)] + [(depth, depth)] * (count - 1)
        return cls(stem=64, units=tuple(units), embedding_dim=512)

    @classmethod
    def tiny(cls, embedding_dim: int = 64) -> IRSEConfig:
        """Four one-unit stages (16, 32, 48, 64 channels): same layout, a few 100k parameters."""
        return cls(stem=16, units=((16, 16), (16, 32), (32, 48), (48, 64)),
                   embedding_dim=embedding_dim)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> IRSEConfig:
        """Read the architecture back from a facexlib-style state dict."""
        try:
            stem = int(state["input_layer.0.weight"].shape[0])
            indices = sorted({int(m.group(1)) for key in state
                              if (m := re.match(r"body\.(\d+)\.", key))})
            units = []
            for i in indices:
                weight = state[f"body.{i}.res_layer.1.weight"]
                units.append((int(weight.shape[1]), int(weight.shape[0])))
            embedding_dim = int(state["output_layer.3.weight"].shape[0])
            fc1 = state[f"body.{indices[0]}.res_layer.5.fc1.weight"]
        except (KeyError, IndexError) as exc:
            raise ValueError(f"not an IR-SE (facexlib arcface) state dict: missing {exc}") from None
        reduction = int(fc1.shape[1]) // max(int(fc1.shape[0]), 1)
        return cls(stem=stem, units=tuple(units), embedding_dim=embedding_dim,
                   se_reduction=reduction)


class SEModule(nn.Module):
    """Squeeze-and-excitation gate (``fc1``/``fc2`` are 1x1 convolutions without bias)."""

    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, channels // reduction, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(channels // reduction, channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))
        return x * gate


class BottleneckIRSE(nn.Module):
    """One improved-residual unit with squeeze-excitation."""

    def __init__(self, in_channels: int, depth: int, stride: int, reduction: int) -> None:
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
            SEModule(depth, reduction),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSEArcFace(nn.Module):
    """IR-SE ArcFace: ``(B, 3, 112, 112)`` in [-1, 1] -> L2-normalised ``(B, E)`` embeddings."""

    def __init__(self, config: IRSEConfig) -> None:
        super().__init__()
        self.config = config
        self.input_layer = nn.Sequential(
            nn.Conv2d(3, config.stem, (3, 3), 1, 1, bias=False),
            nn.BatchNorm2d(config.stem),
            nn.PReLU(config.stem),
        )
        units = []
        for index, (in_channels, depth) in enumerate(config.units):
            stride = 2 if index == 0 or in_channels != depth else 1
            units.append(BottleneckIRSE(in_channels, depth, stride, config.se_reduction))
        self.body = nn.Sequential(*units)
        width = config.units[-1][1]
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(width),
            nn.Dropout(0.6),
            nn.Flatten(),
            nn.Linear(width * 7 * 7, config.embedding_dim),
            nn.BatchNorm1d(config.embedding_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.output_layer(self.body(self.input_layer(x)))
        return x / torch.norm(x, 2, 1, True)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> IRSEArcFace:
        """Build the network the state dict describes and load it strictly (eval mode)."""
        model = cls(IRSEConfig.from_state_dict(state))
        model.load_state_dict(dict(state), strict=True)
        return model.eval()


def strides(config: IRSEConfig) -> Sequence[int]:
    """The stride of each body unit (for documentation and tests)."""
    return [2 if i == 0 or a != b else 1 for i, (a, b) in enumerate(config.units)]
