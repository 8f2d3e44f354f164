"""GoogLeNet variants declared as data: blocks, exact parameter counts, derived channels, MACs.

The parameter counts are the seed post's table (CIFAR-100 and CIFAR-10 columns) except for
Short3/Short4, which the post does not specify (see docs/MODELS.md).
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from helpers import PARAMS
from torch import nn

from sweeper import contract
from sweeper.models import MODULES, VARIANTS, InceptionCfg, UnknownVariant, build_model, count_macs, count_params
from sweeper.models.googlenet import STEM_CHANNELS, Inception, NaiveInception


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a small shared machine, two spinning OpenMP threads per process stall.
    The models built here (naive: 65 M parameters) are dropped when the module is done."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
    model.cache_clear()
    forward_32x32.cache_clear()


CFG = InceptionCfg(n1x1=4, n3x3_reduce=3, n3x3=5, n5x5_reduce=2, n5x5=6, pool_proj=7)


@cache
def model(variant: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return build_model(variant, num_classes, in_channels)


def convs(module: nn.Module) -> list[nn.Conv2d]:
    return [m for m in module.modules() if isinstance(m, nn.Conv2d)]


# --- the two block kinds ---------------------------------------------------------------------


def test_bottleneck_block_has_four_branches_and_concatenates_their_widths():
    block = Inception(10, CFG)
    assert [name for name, _ in block.named_children()] == ["b1", "b2", "b3", "b4"]
    assert block.out_channels == CFG.n1x1 + CFG.n3x3 + CFG.n5x5 + CFG.pool_proj == 22
    out = block(torch.randn(2, 10, 6, 6))
    assert out.shape == (2, 22, 6, 6)  # every branch keeps the spatial size
    # Each branch's final conv produces its slice of the output, in order.
    assert [convs(b)[-1].out_channels for b in (block.b1, block.b2, block.b3, block.b4)] == [4, 5, 6, 7]
    # Every branch reads the block's input (the 1x1 reductions are the bottlenecks).
    assert [convs(b)[0].in_channels for b in (block.b1, block.b2, block.b3, block.b4)] == [10] * 4
    assert [convs(b)[0].kernel_size for b in (block.b1, block.b2, block.b3, block.b4)] == [(1, 1)] * 4


def test_bottleneck_5x5_branch_is_two_stacked_3x3_convs():
    block = Inception(10, CFG)
    kernels = [(c.in_channels, c.out_channels, c.kernel_size) for c in convs(block.b3)]
    assert kernels == [(10, 2, (1, 1)), (2, 6, (3, 3)), (6, 6, (3, 3))]
    assert all(c.kernel_size != (5, 5) for c in convs(block))
    assert all(c.padding == (c.kernel_size[0] // 2,) * 2 for c in convs(block))  # "same" convs
    assert isinstance(block.b4[0], nn.MaxPool2d)  # pool first, then the 1x1 projection
    assert convs(block.b4)[0].kernel_size == (1, 1)


def test_naive_block_passes_the_pooled_input_through_unchanged():
    in_ch = 9
    block = NaiveInception(in_ch, CFG).eval()
    assert block.out_channels == CFG.n1x1 + CFG.n3x3 + CFG.n5x5 + in_ch == 24
    # No 1x1 reductions: the 3x3 and the "5x5" (a 3x3) convs read the input directly.
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs(block)] == [
        (9, 4, (1, 1)),
        (9, 5, (3, 3)),
        (9, 6, (3, 3)),
    ]
    assert isinstance(block.b4, nn.MaxPool2d) and not list(block.b4.parameters())
    x = torch.randn(2, in_ch, 5, 5)
    with torch.no_grad():
        out = block(x)
    assert out.shape == (2, 24, 5, 5)
    pooled = nn.functional.max_pool2d(x, 3, stride=1, padding=1)
    assert torch.equal(out[:, -in_ch:], pooled)


# --- variants --------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(PARAMS))
def test_parameter_counts_match_the_seed_table(variant):
    cifar100, cifar10 = PARAMS[variant]
    assert count_params(model(variant, 100)) == cifar100
    assert count_params(model(variant, 10)) == cifar10


def test_variants_are_the_seven_of_the_seed_in_its_order():
    assert list(VARIANTS) == list(PARAMS)
    assert [VARIANTS[v].inception_modules for v in VARIANTS] == [9, 9, 12, 7, 5, 3, 2]
    for cfg in VARIANTS.values():
        assert all(name in MODULES for stage in cfg.stages for name in stage)


@pytest.mark.parametrize("variant", list(PARAMS))
def test_in_channels_are_derived_from_the_previous_module(variant):
    net = model(variant, 100)
    stem = net.features[0]
    assert convs(stem)[0].in_channels == 3 and convs(stem)[-1].out_channels == STEM_CHANNELS
    block_type = NaiveInception if VARIANTS[variant].block == "naive" else Inception
    blocks = [m for m in net.features if isinstance(m, (Inception, NaiveInception))]
    assert len(blocks) == VARIANTS[variant].inception_modules
    assert all(type(b) is block_type for b in blocks)
    channels = STEM_CHANNELS
    for block in blocks:
        branches = [block.b1, block.b2, block.b3] + ([block.b4] if block_type is Inception else [])
        assert [convs(b)[0].in_channels for b in branches] == [channels] * len(branches)
        channels = block.out_channels
    assert net.linear.in_features == channels
    # Max-pools (3/2/1) sit only between stages.
    pools = [m for m in net.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == len(VARIANTS[variant].stages) - 1
    assert all((p.kernel_size, p.stride, p.padding) == (3, 2, 1) for p in pools)


@pytest.mark.parametrize("variant", list(PARAMS))
def test_forward_and_backward_on_8x8_single_channel(variant):
    net = model(variant, 10, 1)
    net.train()
    out = net(torch.randn(2, 1, 8, 8))
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    net.zero_grad(set_to_none=True)


def flop_counter_macs(net, shape: tuple[int, int, int]) -> tuple[tuple[int, ...], int]:
    """(output shape, MACs of one forward of one image as torch's own flop counter counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    device = next(net.parameters()).device
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = net.eval()(torch.zeros(1, *shape, device=device))
    return tuple(out.shape), counter.get_total_flops() // 2


@cache
def forward_32x32(variant: str) -> tuple[tuple[int, ...], int, int]:
    """(output shape, MACs from count_macs, MACs from torch's own flop counter), one forward."""
    shape, counted = flop_counter_macs(model(variant, 100), (3, 32, 32))
    return shape, count_macs(VARIANTS[variant], (3, 32, 32), 100), counted


@pytest.mark.parametrize("variant", list(PARAMS))
def test_forward_on_32x32_rgb_and_macs(variant):
    shape, macs, expected = forward_32x32(variant)
    assert shape == (1, 100)
    assert macs > 0
    assert macs == expected  # the flop counter counts exactly the convolutions and the classifier
    # launch orders cells by the table's own count (no torch): it is the one count_macs
    assert count_macs is contract.count_macs


def test_table_macs_match_the_built_model_on_digits_shapes():
    for variant, cfg in VARIANTS.items():
        with torch.device("meta"):
            net = build_model(variant, 10, in_channels=1)
        assert contract.count_macs(cfg, (1, 8, 8), 10) == flop_counter_macs(net, (1, 8, 8))[1], variant


def test_macs_are_ordered_by_size():
    macs = {v: forward_32x32(v)[1] for v in PARAMS}
    assert macs["naive"] > 5 * macs["standard"]  # the bottlenecks save most of the compute
    assert macs["naive"] > macs["long"] > macs["standard"] > macs["short"] > macs["short2"]
    assert macs["short2"] > max(macs["short3"], macs["short4"])


def test_batchnorm_eps_is_the_default_everywhere():
    # The seed writes BatchNorm2d(n5x5, n5x5) once, which sets eps=n5x5; we do not copy that.
    for variant in PARAMS:
        norms = [m for m in model(variant, 100).modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms
        assert {m.eps for m in norms} == {1e-5}, variant
        assert all(m.num_features == m.weight.numel() for m in norms)


def test_unknown_variant_lists_the_valid_names():
    with pytest.raises(UnknownVariant) as info:
        build_model("tiny", 10)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    assert "'tiny'" in message
    for name in PARAMS:
        assert name in message
