"""Host tier: HyperLoRARefine on the tiny SDXL-topology model, in-process on the CPU.

The pack is imported as a package (its nodes use relative imports); the MODEL, VAE and CLIP are the tiny ones built
from ComfyUI's own classes, the HyperLoRA a synthetic checkpoint for that UNet.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from comfy_server import show
from nodepack import tiny

from hyperlora_core.lora_io import lora_prefixes
from hyperlora_core.refine import RefineConfig, draw_batch

from helpers import pack_module

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "a photo of fcsks fxhks fhyks, portrait"
STEPS = 30
LR = {"rank_relaxed": 1e-2, "coefficients": 1e-2}


def _pack_module(name: str):
    """``nodes.<name>`` of the repository, imported as a package."""
    return pack_module(f"nodes.{name}")


def _photos(side: int = 64) -> torch.Tensor:
    """Two smooth 'photos' (low-frequency patterns): flips and crops give different but related views."""
    yy, xx = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
    return torch.stack([torch.stack([0.5 + 0.4 * torch.sin(6 * xx + k), 0.5 + 0.4 * torch.cos(5 * yy - k),
                                     0.5 + 0.3 * torch.sin(4 * (xx + yy) + 2 * k)], dim=-1) for k in (0.0, 1.3)])


@pytest.fixture(scope="module")
def setup(comfy, tmp_path_factory):
    training = _pack_module("training")
    hl, identity = tiny.hyperlora_and_identity(tmp_path_factory.mktemp("ckpt"))
    clip = tiny.tiny_clip(seed=0)
    model = tiny.tiny_sdxl(seed=0)
    pristine = {k: v.clone() for k, v in model.model.state_dict().items()}
    return SimpleNamespace(training=training, handle=SimpleNamespace(core=hl), identity=identity, model=model,
                           positive=clip.encode_from_tokens_scheduled(clip.tokenize(PROMPT)),
                           vae=tiny.tiny_vae(seed=0, scale=1.0), images=_photos(), pristine=pristine)


def _config(mode: str, seed: int = 0, steps: int = STEPS, **kw) -> RefineConfig:
    return RefineConfig(mode=mode, steps=steps, lr=kw.pop("lr", LR[mode]), rank=4, seed=seed, batch=4,
                        resolution=64, **kw)


def _run(s, config: RefineConfig, **kw):
    return s.training.refine(s.model, s.vae, s.positive, s.handle, s.identity, s.images, config, **kw)


def _assert_untouched(comfy, s):
    """No patch, wrapper or weight function of the run is left, and once unloaded the weights are the originals."""
    model = s.model
    assert not model.patches and not model.weight_wrapper_patches and not model.object_patches
    leftovers = [n for n, m in model.model.named_modules()
                 if getattr(m, "weight_function", None) or getattr(m, "bias_function", None)]
    assert not leftovers, leftovers[:3]
    comfy.model_management.unload_all_models()
    now = model.model.state_dict()
    changed = [k for k, v in s.pristine.items() if not torch.equal(now[k], v)]
    assert not changed, changed[:3]


def _with_lora(comfy, model, lora, strength: float = 1.0):
    patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0.0)
    return patched


def node_defaults() -> dict:
    """The HyperLoRARefine node's own defaults, read from its schema."""
    schema = _pack_module("refine").HyperLoRARefine.define_schema()
    return {i.id: i.default for i in schema.inputs if getattr(i, "default", None) is not None}


@pytest.mark.parametrize("mode", ["rank_relaxed", "coefficients"])
def test_the_defaults_learn_generalise_and_leave_the_model(comfy, setup, mode):
    """At the node's defaults (lr, steps, rank, batch, id_strength; the resolution scaled by 1/8 like the tiny
    UNet), the mean training loss of the last 10 steps is >= 5 % below the first 10's, and on held-out noise the
    refined LoRA's loss is >= 3 % below the prediction's (both applied as the user will: the prediction at
    id_strength, the refined LoRA at 1.0)."""
    s = setup
    d = node_defaults()
    config = RefineConfig(mode=mode, steps=d["steps"], lr=d["lr"], rank=d["rank"], seed=d["seed"],
                          batch=d["batch_size"], resolution=d["resolution"] // 8, id_strength=d["id_strength"])
    result, losses = _run(s, config)
    assert len(losses) == d["steps"]
    _assert_untouched(comfy, s)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    show(f"\n{mode} at the defaults {config}: mean training loss, first 10 steps {first:.5f}, last 10 {last:.5f} "
         f"({last / first - 1:+.1%})")

    # held out: other noise seeds (so other noise and timesteps), the references without augmentation
    latents = s.training.encode(s.vae, s.images, RefineConfig(resolution=config.resolution, augment=False))
    predicted = s.training.make_lora(s.handle, s.identity, "id", key_format="comfy")
    held_out = [101, 202, 303]
    base = sum(s.training.held_out_loss(_with_lora(comfy, s.model, predicted, config.id_strength), s.positive,
                                        latents, k) for k in held_out)
    ours = sum(s.training.held_out_loss(_with_lora(comfy, s.model, result.lora), s.positive, latents, k)
               for k in held_out)
    show(f"{mode}: held-out loss, prediction {base / 3:.5f}, refined {ours / 3:.5f} ({ours / base - 1:+.1%})")
    assert last <= 0.95 * first
    assert ours <= 0.97 * base
    _assert_untouched(comfy, s)

    p = lora_prefixes(result.lora)[0]
    if mode == "rank_relaxed":
        assert result.identity is None
        rank = predicted[p + ".lora_down.weight"].shape[0]
        assert result.lora[p + ".lora_down.weight"].shape[0] == config.rank + rank
    else:
        assert result.identity.meta.get("refined") == "coefficients"
        norms = result.identity.tokens.float().norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-3)


def test_same_seed_same_result(comfy, setup):
    s = setup
    a, la = _run(s, _config("rank_relaxed", seed=3, steps=4))
    b, lb = _run(s, _config("rank_relaxed", seed=3, steps=4))
    c, _ = _run(s, _config("rank_relaxed", seed=4, steps=4))
    assert la == lb
    assert all(torch.equal(a.lora[k], b.lora[k]) for k in a.lora)
    assert any(not torch.equal(a.lora[k], c.lora[k]) for k in a.lora)
    _assert_untouched(comfy, s)


def test_checkpointing_recomputes_and_gives_the_same_losses(comfy, setup):
    """Checkpointing really recomputes (the transformer blocks run again during backward: see also
    test_refine_memory.py for the bytes it saves) and only recomputes: the losses are those of a run without it."""
    from comfy.ldm.modules.attention import BasicTransformerBlock

    s = setup
    calls = {True: 0, False: 0}
    blocks = [m for m in s.model.model.diffusion_model.modules() if isinstance(m, BasicTransformerBlock)]
    hooks = [b.register_forward_pre_hook(lambda m, a: calls.__setitem__(
        torch._C._current_graph_task_id() != -1, calls[torch._C._current_graph_task_id() != -1] + 1)) for b in blocks]
    try:
        _, with_ckpt = _run(s, _config("rank_relaxed", seed=5, steps=3), checkpointing=True)
        in_backward = calls[True]
        _, without = _run(s, _config("rank_relaxed", seed=5, steps=3), checkpointing=False)
    finally:
        for h in hooks:
            h.remove()
    show(f"\ntransformer-block forwards in backward: {in_backward} with checkpointing, {calls[True] - in_backward} "
         f"without; losses {with_ckpt} / {without}")
    assert in_backward == 3 * len(blocks) and calls[True] == in_backward
    assert max(abs(a - b) for a, b in zip(with_ckpt, without, strict=True)) <= 1e-5 * max(with_ckpt)
    assert not [m for m in s.model.model.modules() if "forward" in m.__dict__]
    _assert_untouched(comfy, s)


def test_bf16_trains_and_its_compute_dtype_does_not_stay_on_the_model(comfy, setup):
    """precision bf16 (autocast and ComfyUI's compute dtype on the clone) also runs on the CPU; the compute dtype is
    an object patch of the training clone, which must be undone on the shared model afterwards."""
    s = setup
    before = s.model.model.manual_cast_dtype
    result, losses = _run(s, _config("rank_relaxed", steps=3), precision="bf16")
    show(f"\nbf16 on the CPU: losses {[round(v, 4) for v in losses]}")
    assert len(losses) == 3 and all(v == v and v < 1e3 for v in losses)
    assert s.model.model.manual_cast_dtype == before
    _assert_untouched(comfy, s)


@pytest.fixture(scope="module")
def fp16_model(comfy):
    return tiny.tiny_sdxl(seed=0, dtype=torch.float16)  # fp16 weights, as ComfyUI loads SDXL on most GPUs


def _unet_input_dtypes(model, run) -> set[torch.dtype]:
    """The dtypes the UNet's first convolution saw while ``run()`` ran."""
    seen: set[torch.dtype] = set()
    conv = model.model.diffusion_model.input_blocks[0][0]
    handle = conv.register_forward_pre_hook(lambda module, args: seen.add(args[0].dtype))
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize("precision,computes", [("auto", torch.float16), ("fp32", torch.float32)])
def test_fp16_model_trains_in_the_asked_precision(comfy, setup, fp16_model, caplog, precision, computes):
    """An fp16 MODEL: under auto (no bf16 on this device) training computes in fp16 with dynamic loss scaling;
    precision fp32 really computes in float32 (the clone's compute dtype, undone afterwards)."""
    s = SimpleNamespace(**{**vars(setup), "model": fp16_model})
    runs = []
    with caplog.at_level(logging.INFO, logger="hyperlora_pack_under_test.nodes.training"):
        seen = _unet_input_dtypes(fp16_model, lambda: runs.append(
            _run(s, _config("rank_relaxed", steps=4), precision=precision)))
    result, losses = runs[0]
    show(f"\nfp16 MODEL, precision {precision}: UNet saw {sorted(map(str, seen))}, losses "
         f"{[round(v, 4) for v in losses]}")
    assert seen == {computes}
    scaled = [r.getMessage() for r in caplog.records if "loss scaling" in r.getMessage()]
    assert bool(scaled) == (computes == torch.float16), scaled
    assert len(losses) == 4 and all(v == v and v < 1e3 for v in losses)
    residual = [v for k, v in result.lora.items() if k.endswith("lora_up.weight")]
    assert any(float(v[:, -4:].abs().max()) > 0 for v in residual)  # the zero-initialised residual learnt
    assert fp16_model.model.manual_cast_dtype is None and fp16_model.model.get_dtype() == torch.float16


@pytest.mark.parametrize("sampling", ["eps", "v_prediction"])
def test_loss_is_the_textbook_loss_of_the_models_own_type(comfy, setup, sampling):
    """Against an independent computation from the UNet's raw output: ε-MSE for eps, v-MSE (v = α·ε − s·x0 with
    α = 1/√(1+σ²), s = σ/√(1+σ²)) for v-prediction."""
    import comfy_extras.nodes_model_advanced as advanced

    s = setup
    model = advanced.ModelSamplingDiscrete().patch(s.model, sampling, False)[0]
    latents = s.training.encode(s.vae, s.images, RefineConfig(resolution=64, augment=False))
    raw: list[torch.Tensor] = []
    hook = model.model.diffusion_model.register_forward_hook(lambda m, i, o: raw.append(o.detach().clone()))
    ours: list[float] = []
    drawn = []

    def body(model_wrap, extra_args, x):
        ms = model_wrap.inner_model.model_sampling
        with torch.no_grad():
            ours.append(float(s.training.batch_loss(model_wrap, extra_args, x, torch.Generator().manual_seed(7), 4,
                                                    None)))
        b = draw_batch(x, torch.Generator().manual_seed(7), 4)
        sigmas = torch.tensor([float(ms.percent_to_sigma(float(p))) for p in b.percent]).view(-1, 1, 1, 1)
        drawn.append((b, sigmas))

    try:
        with torch.inference_mode(False):
            s.training.with_denoiser(model, s.positive, latents, body)
    finally:
        hook.remove()
    (b, sigma), = drawn
    alpha, sin = 1 / torch.sqrt(1 + sigma ** 2), sigma / torch.sqrt(1 + sigma ** 2)
    target = b.noise if sampling == "eps" else alpha * b.noise - sin * b.x0
    reference = float(torch.mean((raw[0].double() - target.double()) ** 2))
    wrong = float(torch.mean((raw[0].double() - (b.x0 if sampling == "eps" else b.noise).double()) ** 2))
    show(f"\n{sampling}: ours {ours[0]:.6f}, reference {reference:.6f}, a wrong target {wrong:.6f}")
    assert abs(ours[0] - reference) <= 1e-4 * reference
    assert abs(wrong - reference) > 1e-2 * reference
    _assert_untouched(comfy, s)


def test_node_schema_and_outputs(comfy, setup):
    s = setup
    node = _pack_module("refine").HyperLoRARefine
    schema = node.define_schema()
    assert all(i.tooltip for i in schema.inputs)
    out = node.execute(s.model, s.vae, s.positive, s.handle, s.identity, s.images, "rank_relaxed", 3, 1e-3, 2, 0,
                       resolution=256)
    identity, lora, curve, lidb = out.result
    assert identity is s.identity and len(lora_prefixes(lora)) == 560 and lidb is None
    assert curve.shape == (1, 256, 512, 3) and float(curve.min()) < 0.5
    _assert_untouched(comfy, s)


def test_interrupt_leaves_the_model_unpatched(comfy, setup, monkeypatch):
    s = setup
    calls = {"n": 0}
    real = comfy.model_management.throw_exception_if_processing_interrupted

    def interrupt_on_third():
        calls["n"] += 1
        if calls["n"] == 3:
            raise comfy.model_management.InterruptProcessingException()
        real()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", interrupt_on_third)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        _run(s, _config("rank_relaxed", steps=10))
    assert calls["n"] == 3
    _assert_untouched(comfy, s)


def test_bad_inputs_are_named(comfy, setup):
    s = setup
    # the pack's own copy of hyperlora_core raises them: match on the class name
    with pytest.raises(ValueError, match="32×32 pixels") as small:
        s.training.refine(s.model, s.vae, s.positive, s.handle, s.identity, s.images[:, :32, :32],
                          _config("rank_relaxed", steps=1))
    assert type(small.value).__name__ == "RefineInputError"
    with pytest.raises(ValueError, match="SDXL") as other:
        s.training.refine(tiny.tiny_sd15(seed=0), s.vae, s.positive, s.handle, s.identity, s.images,
                          _config("rank_relaxed", steps=1))
    assert type(other.value).__name__ == "ModuleMismatchError"
    with pytest.raises(ValueError, match="precision") as precision:
        _run(s, _config("rank_relaxed", steps=1), precision="fp8")
    assert type(precision.value).__name__ == "RefineInputError"
    _assert_untouched(comfy, s)
