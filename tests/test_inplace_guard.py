"""Tier 1: train_comfy.inplace lets autograd run through blocks that add to their stream in place after a
LayerNorm read it (as ComfyUI's Flux blocks do), with the values and gradients of the out-of-place computation."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from train_comfy.inplace import guard_inplace_streams


class SingleStreamBlock(nn.Module):  # named like ComfyUI's Flux block: the guard looks for *StreamBlock
    def __init__(self, inplace: bool):
        super().__init__()
        self.norm, self.lin, self.inplace = nn.LayerNorm(8), nn.Linear(8, 8), inplace

    def forward(self, x):
        if self.inplace:
            x += self.lin(self.norm(x))  # the LayerNorm saved x for its backward
            return x
        return x + self.lin(self.norm(x))


def stack(inplace: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), SingleStreamBlock(inplace), SingleStreamBlock(inplace))


def grads(model: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(1))
    out = model(x)
    out.pow(2).sum().backward()
    return out.detach(), [p.grad for p in model.parameters()]


def test_without_the_guard_autograd_refuses():
    with pytest.raises(RuntimeError, match="inplace"):
        grads(stack(inplace=True))


def test_with_the_guard_values_and_gradients_are_those_of_the_out_of_place_model():
    guarded = stack(inplace=True)
    assert guard_inplace_streams(guarded) == 2
    out, got = grads(guarded)
    ref_out, want = grads(stack(inplace=False))
    assert torch.equal(out, ref_out)
    assert all(torch.allclose(g, w, rtol=0, atol=1e-6) for g, w in zip(got, want, strict=True))


def test_other_blocks_are_left_as_they_are():
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8))
    assert guard_inplace_streams(model) == 0
    assert not model[0]._forward_pre_hooks


def test_without_gradients_nothing_is_copied():
    model = stack(inplace=True)
    guard_inplace_streams(model)
    seen = []
    model[1].norm.register_forward_hook(lambda m, args, out: seen.append(args[0]))
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        h = model[0](x)
        model[1](h)
    assert seen[0] is h  # the LayerNorm read the stream itself
