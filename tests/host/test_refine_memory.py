"""Host tier: what one HyperLoRA Refine step keeps for backward, counted by autograd's saved-tensor hooks.

The tiny SDXL-topology UNet is built inside ``torch.inference_mode()``, as ComfyUI's executor loads every model,
and trained at 128² (16² latents). Saved tensors are deduplicated by storage; storages that are the model's own
parameters are references and cost nothing. A saved tensor shaped like one of the UNet's weights is a weight copy
(``W + ΔW`` of a target linear, or a copy of a frozen weight); the rest are activations.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from comfy_server import show
from nodepack import tiny
from test_refine import PROMPT, _assert_untouched, _pack_module, _photos

from hyperlora_core import lora_delta
from hyperlora_core.lora_io import lora_prefixes
from hyperlora_core.refine import RefineConfig

RESOLUTION = 128


@dataclass
class StepMemory:
    """What one training step saved for backward, and which blocks ran again during backward."""

    activations: int = 0  # bytes
    weight_copies: int = 0  # bytes of saved tensors shaped like a UNet weight, not the weight itself
    references: int = 0  # bytes of the model's own parameters saved by reference (not extra memory)
    forwards: int = 0  # transformer-block and ResBlock forward calls outside backward
    need_grad: int = 0  # forwards whose output needs a gradient (not the ResBlocks before the first LoRA)
    reruns: int = 0  # ... and inside backward (checkpointing recomputes them)
    seen: set[int] = field(default_factory=set)

    @property
    def saved(self) -> int:
        return self.activations + self.weight_copies


# (weights' dtype, refine precision): fp32 throughout, and the full-size bench's fp16 weights computing in bf16,
# where every layer casts its weight to the compute dtype (a copy) before using it
PRECISIONS = {"fp32": (None, "fp32"), "fp16-weights-bf16": (torch.float16, "bf16")}


@pytest.fixture(scope="module", params=list(PRECISIONS))
def inference_setup(comfy, tmp_path_factory, request):
    weights, precision = PRECISIONS[request.param]
    with torch.inference_mode():  # as ComfyUI's executor loads models: every weight is an inference tensor
        model = tiny.tiny_sdxl(seed=0, dtype=weights)
    assert all(p.is_inference() for p in model.model.parameters())
    hl, identity = tiny.hyperlora_and_identity(tmp_path_factory.mktemp("ckpt"))
    clip = tiny.tiny_clip(seed=0)
    return SimpleNamespace(training=_pack_module("training"), handle=SimpleNamespace(core=hl), identity=identity,
                           model=model, positive=clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT)),
                           vae=tiny.tiny_vae(seed=0, scale=1.0), images=_photos(RESOLUTION), precision=precision,
                           pristine={k: v.clone() for k, v in model.model.state_dict().items()})


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def one_step(comfy, s, mode: str, checkpointing: bool) -> StepMemory:
    """Run one refinement step on ``s.model`` and account for what it saved for backward."""
    from comfy.ldm.modules.attention import BasicTransformerBlock
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    unet = s.model.model.diffusion_model
    params = {p.untyped_storage().data_ptr() for p in s.model.model.parameters()}
    weight_shapes = {tuple(p.shape) for p in unet.parameters() if p.ndim >= 2}
    mem = StepMemory()

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if not _in_backward() and ptr not in mem.seen:
            mem.seen.add(ptr)
            if ptr in params:
                mem.references += storage.nbytes()
            elif tuple(t.shape) in weight_shapes:
                mem.weight_copies += storage.nbytes()
            else:
                mem.activations += storage.nbytes()
        return t

    def count(module, args, output):
        if _in_backward():
            mem.reruns += 1
        else:
            mem.forwards += 1
            mem.need_grad += bool(output.requires_grad)

    # a checkpointed unit's own forward runs without hooks when recomputed, so count the blocks inside the units:
    # each transformer block, and each ResBlock's input layers
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    blocks += [m.in_layers for m in unet.modules() if isinstance(m, ResBlock)]
    hooks = [m.register_forward_hook(count) for m in blocks]
    config = RefineConfig(mode=mode, steps=1, seed=0, resolution=RESOLUTION, augment=False)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            s.training.refine(s.model, s.vae, s.positive, s.handle, s.identity, s.images, config,
                              checkpointing=checkpointing, precision=s.precision)
    finally:
        for h in hooks:
            h.remove()
    return mem


def _target_bytes(s) -> int:
    weights = s.model.model.state_dict()
    predicted = s.training.make_lora(s.handle, s.identity, "id", key_format="comfy")
    return sum(weights[p + ".weight"].numel() * weights[p + ".weight"].element_size() for p in lora_prefixes(predicted))


@pytest.mark.parametrize("mode", ["rank_relaxed", "coefficients"])
def test_checkpointing_saves_a_third_or_less_and_reruns_the_blocks(comfy, inference_setup, mode):
    s = inference_setup
    on = one_step(comfy, s, mode, checkpointing=True)
    off = one_step(comfy, s, mode, checkpointing=False)
    show(f"\n{mode}, 128²: saved for backward {off.saved / 2**20:.1f} MiB without checkpointing, "
         f"{on.saved / 2**20:.1f} MiB with ({on.saved / off.saved:.3f}×); block forwards {off.forwards} / "
         f"{on.forwards} ({on.need_grad} needing a gradient), re-run in backward {off.reruns} / {on.reruns}")
    assert on.saved <= off.saved / 3
    assert off.reruns == 0 and on.forwards == off.forwards > 0
    assert on.reruns == on.need_grad >= 0.9 * on.forwards  # each block that backward goes through ran again, once
    _assert_untouched(comfy, s)


@pytest.mark.parametrize("mode", ["rank_relaxed", "coefficients"])
def test_no_weight_is_copied_for_backward(comfy, inference_setup, mode):
    """Without checkpointing, the only weight-sized tensors kept are the target linears' W + ΔW; the frozen
    weights are saved by reference, also where each layer casts them to the compute dtype (fp16 weights, bf16
    compute). With checkpointing, not even those."""
    s = inference_setup
    targets = _target_bytes(s)
    off = one_step(comfy, s, mode, checkpointing=False)
    on = one_step(comfy, s, mode, checkpointing=True)
    unet = sum(p.numel() * p.element_size() for p in s.model.model.diffusion_model.parameters())
    show(f"\n{mode}: target linears {targets / 2**20:.1f} MiB of a {unet / 2**20:.1f} MiB UNet; weight-sized "
         f"tensors saved {off.weight_copies / 2**20:.1f} MiB without checkpointing, {on.weight_copies / 2**20:.1f} "
         f"MiB with; by reference {off.references / 2**20:.1f} MiB")
    assert off.weight_copies < 1.1 * targets
    if s.precision == "fp32":  # frozen weights really were saved, by reference (cast ones are kept as references
        assert off.references > 0  # to the layer, which these hooks do not see)
    assert on.weight_copies < 0.1 * targets
    _assert_untouched(comfy, s)


def test_casts_kept_by_reference_train_exactly_as_kept_casts(comfy, inference_setup, monkeypatch):
    """Casting the frozen weights again in the backward pass gives bit for bit the gradients of keeping the casts:
    the same losses and the same LoRA after a few steps (fp16 weights computing in bf16: every layer casts)."""
    s = inference_setup
    config = RefineConfig(mode="rank_relaxed", steps=3, seed=2, resolution=64, augment=False, lr=1e-2)

    def run():
        result, losses = s.training.refine(s.model, s.vae, s.positive, s.handle, s.identity, s.images, config,
                                           precision=s.precision, checkpointing=False)
        return result.lora, losses

    by_reference = run()
    monkeypatch.setattr(s.training, "casts_by_reference", lambda unet: contextlib.nullcontext())
    kept = run()
    differ = [k for k in kept[0] if not torch.equal(kept[0][k], by_reference[0][k])]
    show(f"\n{s.precision}: losses {by_reference[1]} by reference, {kept[1]} kept; {len(differ)} LoRA tensors differ")
    assert by_reference[1] == kept[1] and not differ
    assert by_reference[1][0] != by_reference[1][-1]  # it trained


@pytest.mark.parametrize("mode", ["rank_relaxed", "coefficients"])
def test_the_saved_lora_at_1_gives_the_weights_training_saw(comfy, inference_setup, monkeypatch, mode):
    """id_strength is trained in: the output LoRA, loaded by ComfyUI at 1.0, equals W + the last step's delta
    exactly; and the run started from the prediction at id_strength."""
    s = inference_setup
    made = []
    real = s.training._parametrisation
    monkeypatch.setattr(s.training, "_parametrisation", lambda *a: made.append(real(*a)) or made[-1])
    config = RefineConfig(mode=mode, steps=2, seed=1, resolution=64, augment=False, id_strength=0.85, lr=1e-2)
    predicted = s.training.make_lora(s.handle, s.identity, "id", key_format="comfy")
    start = real(s.handle, s.identity, predicted, config)
    p0 = lora_prefixes(predicted)[0]
    assert torch.allclose(start.delta(0), 0.85 * lora_delta(predicted, p0).float(), atol=1e-6)
    result, _ = s.training.refine(s.model, s.vae, s.positive, s.handle, s.identity, s.images, config)
    param = made[0]
    weights = {k: v.clone() for k, v in s.model.model.state_dict().items()}
    trained = {p + ".weight": s.training._Delta(param, i)(weights[p + ".weight"]) for i, p in enumerate(param.prefixes)}
    loaded, _ = comfy.sd.load_lora_for_models(s.model, None, result.lora, 1.0, 0.0)
    comfy.model_management.load_models_gpu([loaded])
    try:
        now = loaded.model.state_dict()
        differ = [k for k, v in trained.items() if not torch.equal(now[k], v.detach())]
        moved = [k for k, v in trained.items() if not torch.equal(weights[k], v.detach())]
    finally:
        comfy.model_management.unload_all_models()
    show(f"\n{mode}: {len(trained)} target weights, {len(moved)} changed by training, {len(differ)} differ from "
         f"the saved LoRA loaded at 1.0")
    assert len(moved) == len(trained) and not differ
    _assert_untouched(comfy, s)


FREED_BACK = """
import importlib.util, json, sys
from pathlib import Path
import torch
spec = importlib.util.spec_from_file_location("checkpointing", sys.argv[1])
checkpointing = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checkpointing)

def rss_anon():
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("RssAnon"))

def freed_back(n=64):
    big = torch.ones(30 << 18)  # 30 MiB, freed: glibc's sliding mmap threshold rises above 4 MiB
    del big
    blocks = [torch.ones(1 << 20) for _ in range(n)]  # 64 x 4 MiB
    keep = torch.ones(1 << 20)  # allocated after them: the heap cannot shrink from its top
    before = rss_anon()
    del blocks
    after = rss_anon()
    del keep  # now the freed blocks are the heap's top, which glibc gives back: the next call starts clean
    return before - after

if checkpointing._libc() is None:
    print(json.dumps(None))
    sys.exit()
with checkpointing.heap_returned(torch.device(sys.argv[2])) as applies:
    freed = freed_back() if applies else None
print(json.dumps({"freed": freed if applies else freed_back(), "applies": applies}))
"""


def test_heap_returned_gives_freed_tensors_back_to_the_system(comfy):
    """On the CPU, training's freed weight casts and activations leave the process at once instead of staying in
    glibc's heap; the same frees outside it (the negative control) stay resident. In a fresh process: glibc serves
    a request from a free hole of its heap before any threshold applies, and this one's heap has had many."""
    path = Path(__file__).resolve().parents[2] / "nodes" / "checkpointing.py"

    def freed(device: str):  # each in a fresh process
        done = subprocess.run([sys.executable, "-c", FREED_BACK, str(path), device], capture_output=True, text=True,
                              timeout=300, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        return json.loads(done.stdout.strip().splitlines()[-1])

    inside, outside = freed("cpu"), freed("cuda")  # on a GPU device it does not apply: the negative control
    if inside is None:
        pytest.skip("glibc only (Linux): other C libraries manage their heap differently")
    size = 64 * (4 << 20)
    show(f"\nfreeing 256 MiB of 4 MiB tensors below a live one gives back {outside['freed'] / 2**20:.0f} MiB "
         f"without heap_returned, {inside['freed'] / 2**20:.0f} MiB inside it")
    assert inside["applies"] and not outside["applies"]
    assert outside["freed"] < 0.5 * size
    assert inside["freed"] > 0.9 * size
