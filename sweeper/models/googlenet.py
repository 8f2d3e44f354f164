"""GoogLeNet variants of the seed post, built from the table in ``sweeper.contract``.

Each Inception module is one row of ``MODULES`` (output widths only); a variant is a
sequence of stages, each a tuple of module names, with a 3/2/1 max-pool between stages.
In-channels are always derived from the previous module, never written down.

>>> model = build_model("short4", num_classes=10, in_channels=1)
>>> model(torch.zeros(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

import torch
from torch import nn

from sweeper.contract import MODULES, STEM_CHANNELS, VARIANTS, InceptionCfg, VariantCfg


def conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2),
        # The seed writes BatchNorm2d(n5x5, n5x5) once, i.e. eps=n5x5; we use the default eps.
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    )


class Inception(nn.Module):
    """Bottleneck block: 1x1 | 1x1->3x3 | 1x1->3x3->3x3 (for 5x5) | pool->1x1, concatenated."""

    def __init__(self, in_ch: int, cfg: InceptionCfg):
        super().__init__()
        self.b1 = conv_bn_relu(in_ch, cfg.n1x1, 1)
        self.b2 = nn.Sequential(conv_bn_relu(in_ch, cfg.n3x3_reduce, 1), conv_bn_relu(cfg.n3x3_reduce, cfg.n3x3, 3))
        self.b3 = nn.Sequential(
            conv_bn_relu(in_ch, cfg.n5x5_reduce, 1),
            conv_bn_relu(cfg.n5x5_reduce, cfg.n5x5, 3),
            conv_bn_relu(cfg.n5x5, cfg.n5x5, 3),
        )
        self.b4 = nn.Sequential(nn.MaxPool2d(3, stride=1, padding=1), conv_bn_relu(in_ch, cfg.pool_proj, 1))
        self.out_channels = cfg.n1x1 + cfg.n3x3 + cfg.n5x5 + cfg.pool_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class NaiveInception(nn.Module):
    """No bottleneck: 1x1 | 3x3 | 3x3 (for 5x5) straight from the input | max-pool passed through."""

    def __init__(self, in_ch: int, cfg: InceptionCfg):
        super().__init__()
        self.b1 = conv_bn_relu(in_ch, cfg.n1x1, 1)
        self.b2 = conv_bn_relu(in_ch, cfg.n3x3, 3)
        self.b3 = conv_bn_relu(in_ch, cfg.n5x5, 3)
        self.b4 = nn.MaxPool2d(3, stride=1, padding=1)
        self.out_channels = cfg.n1x1 + cfg.n3x3 + cfg.n5x5 + in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


BLOCKS = {"bottleneck": Inception, "naive": NaiveInception}


class GoogLeNet(nn.Module):
    def __init__(self, cfg: VariantCfg, num_classes: int, in_channels: int = 3, dropout: float = 0.4):
        super().__init__()
        block = BLOCKS[cfg.block]
        layers: list[nn.Module] = [conv_bn_relu(in_channels, STEM_CHANNELS, 3)]
        channels = STEM_CHANNELS
        for i, stage in enumerate(cfg.stages):
            if i > 0:
                layers.append(nn.MaxPool2d(3, stride=2, padding=1))
            for name in stage:
                module = block(channels, MODULES[name])
                layers.append(module)
                channels = module.out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x)).flatten(1)
        return self.linear(self.dropout(x))


class UnknownVariant(ValueError):
    pass


def build_model(
    variant: str, num_classes: int, in_channels: int = 3, variants: dict[str, VariantCfg] | None = None
) -> GoogLeNet:
    """``variants``: the table to look the name up in (default the built-in ones; a study passes
    its own, see sweeper.spec.variant_cfgs)."""
    table = VARIANTS if variants is None else variants
    if variant not in table:
        raise UnknownVariant(f"unknown variant {variant!r}; choose one of: {', '.join(table)}")
    return GoogLeNet(table[variant], num_classes=num_classes, in_channels=in_channels)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
