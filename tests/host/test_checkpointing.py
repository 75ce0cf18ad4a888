"""Host tier: gradient checkpointing on ComfyUI's own diffusion models, UNets and a DiT, built from its classes.

For each UNet: the checkpointed forward and backward give the same output and gradients as the plain one, keep
far fewer bytes for backward (autograd's saved-tensor hooks), run the units again during backward, and leave no
patched ``forward`` behind. For the DiT (Flux): the same units, bytes and re-runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.utils.checkpoint
from comfy_server import show
from nodepack import tiny
from test_refine import _pack_module


def _sdxl():
    unet = tiny.tiny_sdxl(seed=0).model.diffusion_model
    return unet, lambda x: unet(x, torch.tensor([500.0, 20.0]), context=torch.randn(2, 8, 64), y=torch.randn(2, 1568))


def _sd15():
    unet = tiny.tiny_sd15(seed=0).model.diffusion_model
    return unet, lambda x: unet(x, torch.tensor([500.0, 20.0]), context=torch.randn(2, 8, 64))


def _flux():
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    net = Flux(operations=comfy.ops.disable_weight_init, in_channels=4, out_channels=4, vec_in_dim=16,
               context_in_dim=32, hidden_size=64, mlp_ratio=2.0, num_heads=4, depth=2, depth_single_blocks=3,
               axes_dim=[4, 6, 6], theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)
    tiny.randomise(net, 0)
    return net, lambda x: net(x, torch.tensor([0.5, 0.9]), torch.randn(2, 8, 32), y=torch.randn(2, 16),
                              guidance=torch.tensor([3.5, 3.5]))


CASES = {"sdxl_unet": _sdxl, "sd15_unet": _sd15}


def _cloning(forward):
    """The reference wrapper: the unit runs on copies of its tensor inputs (Flux's blocks add to them in place,
    which autograd cannot see through the saved-tensor hooks), nothing else."""
    def run(*args, **kwargs):
        args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
        return forward(*args, **{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
    return run


def _naive(forward):
    """Checkpointing without the copies: the in-place additions change the inputs kept for the recomputation."""
    def run(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return run


def _step(checkpointing: bool, make, ckpt_module, wrap=_cloning):
    torch.manual_seed(0)
    net, forward = make()
    if not checkpointing:
        for unit in ckpt_module.checkpoint_units(net):
            unit.forward = wrap(unit.forward)
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    saved, seen = [0], set()
    calls = {"forward": 0, "backward": 0}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            saved[0] += t.untyped_storage().nbytes()
        return t

    leaves = [m for m in net.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.__setitem__(
        "backward" if torch._C._current_graph_task_id() != -1 else "forward",
        calls["backward" if torch._C._current_graph_task_id() != -1 else "forward"] + 1)) for m in leaves]
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}  # saved by reference: not counted
    try:
        with ckpt_module.gradient_checkpointing(net, checkpointing) as units, \
                torch.autograd.graph.saved_tensors_hooks(
                    lambda t: t if t.untyped_storage().data_ptr() in params else pack(t), lambda t: t):
            out = forward(x)
            (out.float() ** 2).mean().backward()
    finally:
        for h in hooks:
            h.remove()
        if not checkpointing:
            for unit in ckpt_module.checkpoint_units(net):
                del unit.forward
    assert not [m for m in net.modules() if "forward" in m.__dict__]
    return out.detach(), x.grad, saved[0], calls, units


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpointing_recomputes_the_same_with_less_kept(comfy, case):
    ckpt = _pack_module("checkpointing")
    out_a, grad_a, saved_a, calls_a, units = _step(True, CASES[case], ckpt)
    out_b, grad_b, saved_b, calls_b, _ = _step(False, CASES[case], ckpt)
    show(f"\n{case}: {units} units checkpointed; saved {saved_a / 2**20:.2f} MiB vs {saved_b / 2**20:.2f} MiB "
         f"({saved_a / saved_b:.3f}×); layer calls in backward {calls_a['backward']} vs {calls_b['backward']}")
    assert units > 3
    assert torch.equal(out_a, out_b)
    assert calls_b["backward"] == 0 and calls_a["backward"] > 0.5 * calls_a["forward"]
    assert torch.allclose(grad_a, grad_b, rtol=1e-4, atol=1e-6) and float(grad_b.abs().max()) > 0
    assert saved_a <= saved_b / 3


def test_a_dit_is_checkpointed_block_by_block(comfy):
    """Flux (ComfyUI's DiT): its double and single blocks are the units, they run again in backward, and far less
    is kept. (No gradient reference: ComfyUI's Flux blocks add in place to tensors autograd saved, so a plain
    backward through them raises; only their inference path is meant to be used.)"""
    ckpt = _pack_module("checkpointing")
    names = [type(u).__name__ for u in ckpt.checkpoint_units(_flux()[0])]
    _, _, saved_a, calls_a, units = _step(True, _flux, ckpt)
    _, _, saved_b, calls_b, _ = _step(False, _flux, ckpt)
    show(f"\nflux_dit: units {names}; saved {saved_a / 2**20:.2f} MiB vs {saved_b / 2**20:.2f} MiB "
         f"({saved_a / saved_b:.3f}×); layer calls in backward {calls_a['backward']} vs {calls_b['backward']}")
    assert names.count("DoubleStreamBlock") == 2 and names.count("SingleStreamBlock") == 3
    assert saved_a <= saved_b / 3
    assert calls_b["backward"] == 0 and calls_a["backward"] > 0.5 * calls_a["forward"]


class _AddsToItsInput(torch.nn.Module):
    """A unit that, like Flux's blocks, adds to one of its inputs in place: out = lin(x) · (y + 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, y):
        y += 1
        return self.lin(x) * y


def test_units_that_add_to_their_inputs_in_place_get_the_right_gradients(comfy):
    """Negative control for the copies in the checkpointed forward: plain non-reentrant checkpointing of such a
    unit fails in backward (its kept input was changed); ours gives the analytic gradient W^T (y + 1)."""
    ckpt = _pack_module("checkpointing")
    root = torch.nn.Sequential(_AddsToItsInput())
    x = torch.randn(3, 4, requires_grad=True)
    y = torch.randn(3, 4)
    with ckpt.gradient_checkpointing(root) as units:
        root[0](x, y.clone()).sum().backward()
    expected = (y + 1) @ root[0].lin.weight
    show(f"\nmax |grad - analytic|: {float((x.grad - expected).abs().max()):.2e}")
    assert units == 1 and torch.allclose(x.grad, expected, atol=1e-6)
    root[0].forward = _naive(root[0].forward)
    with pytest.raises(RuntimeError, match="inplace"):
        root[0](x, y.clone()).sum().backward()
