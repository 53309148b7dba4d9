"""Lesson 01: the residual block. (Lesson card to be completed by the lesson-01 work.)"""

# %%
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import helpers

# --- constants ---------------------------------------------------------------------------------------
SEED = 0  # random seed for weights and inputs
DEVICE = "cpu"  # auto | cpu | cuda | mps
OUT = "outputs/01_basic_residual_block"  # folder for results.json and figures
# --- end constants -----------------------------------------------------------------------------------


# %% The blocks
def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1: keeps H and W when stride is 1, halves them when stride is 2.
    No bias: the batch norm that follows has its own shift, which would make a bias redundant."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def projection_shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """W_s x of He et al. 2015, Eq. 2: a strided 1x1 convolution plus batch norm, used only where the
    branch changes the shape, so that F(x) and the shortcut can be added."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class PlainBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and ReLU, no shortcut: y = relu(F(x))."""

    expansion = 1  # output channels per `out_channels` (a bottleneck block has 4)

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) = BN(W2 * relu(BN(W1 * x))). (B, C_in, H, W) -> (B, C_out, H/s, W/s)"""
        out = F.relu(self.bn1(self.conv1(x)))  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        return self.bn2(self.conv2(out))  # (B, C_out, H/s, W/s), same shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x))  # y = relu(F(x))


class ResidualBlock(PlainBlock):
    """The basic residual block of He et al. 2015 (torchvision's `BasicBlock`): y = relu(F(x) + shortcut(x)).

    The shortcut is the identity when shapes match (Eq. 1) and `make_shortcut(in, out, stride)` when they
    do not (Eq. 2; a 1x1 projection by default). The attribute is called `downsample` because torchvision
    calls it so, which lets lesson 02 load torchvision's weights into blocks built from this class."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, make_shortcut=projection_shortcut):
        super().__init__(in_channels, out_channels, stride)
        shape_changes = stride != 1 or in_channels != out_channels
        self.downsample = make_shortcut(in_channels, out_channels, stride) if shape_changes else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.downsample is None else self.downsample(x)  # x (Eq. 1) or W_s x (Eq. 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.branch(x) + self.shortcut(x))  # y = relu(F(x, {W_i}) + x)  (He et al. 2015, Eq. 1)


# %%
def main(**overrides):
    cfg = helpers.config(globals(), overrides)
    return {"config": cfg}


if __name__ == "__main__":
    helpers.run_cli(main, globals())
