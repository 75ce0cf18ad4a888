"""ComfyUI's side of fast refinement: trainable weight wrappers on a clone, the denoiser, the training loop's host.

The identity's LoRA is not merged: each target weight of a ``clone()`` of the MODEL gets a weight wrapper (as
ComfyUI's own TrainLoraNode does) that adds the parametrisation's differentiable delta during the forward pass.
The denoiser is the guider's model wrapper (conds processed as for sampling), which predicts x0; the loss is taken
in the model's own output space through ``model_sampling`` (see ``hyperlora_core.refine.denoising_loss``), so eps,
v-prediction and flow models are handled alike. Nothing of a run stays on the incoming MODEL.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import torch

from ..hyperlora_core.arithmetic import combine_by_rank
from ..hyperlora_core.errors import LidbMismatchError
from ..hyperlora_core.finetune import CoefficientLoRA, LidbOnBase, Parametrisation, RankRelaxed, RefineResult
from ..hyperlora_core.lidb import LIDB_SEED, LiDB, LidbAux, targets_from_shapes
from ..hyperlora_core.lora_io import lora_prefixes
from ..hyperlora_core.refine import RefineConfig, RefineInputError, denoising_loss, draw_batch, reference_views, train
from .apply import check_model, make_lora
from .checkpointing import casts_by_reference, frozen_by_reference, gradient_checkpointing, heap_returned

log = logging.getLogger(__name__)

PRECISIONS = ["auto", "bf16", "fp32"]
ACTIVATION_FACTOR = 3  # training keeps activations for backward: a few times what one inference pass needs


class _Delta:
    """Weight wrapper of a target linear: ``(weight + up @ down)`` in float32, cast back to the weight's dtype:
    the same arithmetic as ComfyUI's LoRA patch of the saved result at strength 1.0 (never under autocast)."""

    def __init__(self, param: Parametrisation, index: int) -> None:
        self.param, self.index = param, index

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.autocast(weight.device.type, enabled=False):
            delta = self.param.delta(self.index).to(weight.device)
            return (weight.float() + delta).to(weight.dtype)


def wrapped_clone(model, param: Parametrisation):
    """A clone of ``model`` whose target weights add the parametrisation's deltas; the others are untouched (a
    weight wrapper would make ComfyUI copy the weight on every call)."""
    mp = model.clone()
    for index, prefix in enumerate(param.prefixes):
        mp.add_weight_wrapper(prefix + ".weight", _Delta(param, index))
    return mp


def release(mp) -> None:
    """Unload this clone (restoring its object patches) and take its wrappers off the modules it shares with the
    incoming MODEL (ComfyUI clears weight functions on unload only for partially loaded models)."""
    for i in reversed(range(len(mm.current_loaded_models))):
        if mm.current_loaded_models[i].model is mp:
            mm.current_loaded_models.pop(i).model_unload()
    ours = {id(f) for fs in mp.weight_wrapper_patches.values() for f in fs}
    for module in mp.model.modules():
        for attr in ("weight_function", "bias_function"):
            fs = getattr(module, attr, None)
            if fs:
                setattr(module, attr, [f for f in fs if id(f) not in ours])
    mp.weight_wrapper_patches = {}


class _Once(comfy.samplers.Sampler):
    """A 'sampler' that hands the guider's model wrapper to ``body`` once, inside the sampling context."""

    def __init__(self, body: Callable) -> None:
        self.body = body

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.body(model_wrap, extra_args, latent_image)
        return torch.zeros_like(latent_image)


def with_denoiser(mp, positive, latents: torch.Tensor, body: Callable) -> None:
    """``body(model_wrap, extra_args, model-space latents)`` with conds processed and the model loaded."""
    import comfy_extras.nodes_custom_sampler as custom

    guider = custom.Guider_Basic(mp)
    guider.set_conds(positive)
    guider.sample(torch.zeros_like(latents), latents, _Once(body), torch.ones(2), disable_pbar=True, seed=0)


def batch_loss(model_wrap, extra_args, latents: torch.Tensor, generator: torch.Generator, batch: int,
               dtype: torch.dtype | None) -> torch.Tensor:
    """The denoising loss of one seeded batch, in the model's own output space (ε, v, ...)."""
    ms = model_wrap.inner_model.model_sampling
    b = draw_batch(latents, generator, batch)
    sigmas = torch.tensor([float(ms.percent_to_sigma(float(p))) for p in b.percent], device=latents.device)
    xt = ms.noise_scaling(sigmas, b.noise, b.x0, False)
    x0 = ms.noise_scaling(torch.zeros_like(sigmas), torch.zeros_like(b.noise), b.x0, False)
    ones = torch.ones((batch, 1, 1, 1), device=latents.device)
    out_scale = ms.calculate_denoised(sigmas, ones, torch.zeros_like(ones)).abs().flatten()
    half = dtype in (torch.float16, torch.bfloat16)
    with torch.autocast(latents.device.type, dtype=dtype if half else torch.float32, enabled=half):
        x0_pred = model_wrap(xt, sigmas, **extra_args)
    return denoising_loss(x0_pred, x0, out_scale)


def encode(vae, images: torch.Tensor, config: RefineConfig) -> torch.Tensor:
    """VAE latents (VAE space, float32) of the references' training views."""
    views = reference_views(images, config)
    with torch.no_grad():  # the VAE's weights may be inference tensors: no graph through it
        latents = torch.cat([vae.encode(views[i:i + 4]) for i in range(0, views.shape[0], 4)])
    return latents.detach().float().clone()


def held_out_loss(model, positive, latents: torch.Tensor, seed: int, batches: int = 4, batch: int = 4) -> float:
    """Mean denoising loss of ``model`` on ``latents`` over seeded noise and timesteps (evaluation, no grad)."""
    losses: list[float] = []

    def body(model_wrap, extra_args, x):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            losses.extend(float(batch_loss(model_wrap, extra_args, x, g, batch, None)) for _ in range(batches))

    with torch.inference_mode(False):
        with_denoiser(model, positive, latents, body)
    return sum(losses) / len(losses)


def training_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The compute dtype to set on the clone: fp32 or bf16 where asked (any device); under auto, bf16 on a GPU
    that runs it natively, else None (the model's own, with loss scaling when that is fp16)."""
    if precision not in PRECISIONS:
        raise RefineInputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "fp32":
        return torch.float32
    if precision == "bf16" or (precision == "auto" and device.type == "cuda" and mm.should_use_bf16(device)):
        return torch.bfloat16
    return None


def compute_dtype(mp) -> torch.dtype:
    """The dtype the (loaded) clone's UNet computes in: its manual cast dtype, else its weights'."""
    return getattr(mp.model, "manual_cast_dtype", None) or mp.model.get_dtype()


def weight_shapes(model) -> dict[str, tuple[int, ...]]:
    """``{key without .weight: shape}`` of every 2-D weight of the MODEL (its linears)."""
    return {k[:-len(".weight")]: tuple(v.shape) for k, v in model.model_state_dict().items()
            if k.endswith(".weight") and v.ndim == 2}


def attention_targets(model) -> dict[str, tuple[int, int]]:
    """The MODEL's attention linears (``attn1``/``attn2`` ``to_q``, ``to_k``, ``to_v``, ``to_out.0``), state-dict
    order: what a LiDB trained from zero adapts."""
    ends = tuple(f".{attn}.{lin}" for attn in ("attn1", "attn2") for lin in ("to_q", "to_k", "to_v", "to_out.0"))
    found = {k: v for k, v in weight_shapes(model).items() if k.endswith(ends)}
    if not found:
        raise RefineInputError("this MODEL has no attention linears (attn1/attn2 to_q, to_k, to_v, to_out.0) to "
                               "train a LiDB on: use a UNet model such as SDXL")
    return found


def _lidb(model, predicted, start: LiDB | None, config: RefineConfig, base) -> LidbOnBase:
    """Mode lidb: on the starting LiDB's linears, else the prediction's, else the MODEL's attention linears."""
    if start is not None:
        if (start.a, start.b) != (config.lidb_a, config.lidb_b):
            raise RefineInputError(f"the connected LiDB has a={start.a}, b={start.b}; set lidb_a and lidb_b to "
                                   "them to continue training it")
        targets, seed = start.targets, start.seed
    else:
        shapes = ({p: (predicted[p + ".lora_up.weight"].shape[0], predicted[p + ".lora_down.weight"].shape[1])
                   for p in lora_prefixes(predicted)} if predicted is not None else attention_targets(model))
        targets, seed = targets_from_shapes(type(model.model.model_config).__name__, shapes), LIDB_SEED
    meta = ({"trained_on": "the HyperLoRA prediction", "id_strength": str(config.id_strength)}
            if predicted is not None else {"trained_on": "the base model"})
    pbar = comfy.utils.ProgressBar(len(targets.linears))  # the aux matrices: seconds for SDXL's 560 linears
    aux = LidbAux(targets, seed=seed, a=config.lidb_a, b=config.lidb_b,
                  progress=lambda done, total: pbar.update_absolute(done, total))
    return LidbOnBase(aux, base, seed=config.seed, start=start, meta=meta)


def _parametrisation(handle, identity, predicted, config: RefineConfig, model=None,
                     start: LiDB | None = None) -> Parametrisation:
    """The mode's trainable form; the frozen base is the prediction at id_strength and/or (rank_relaxed) the
    starting LiDB at 1.0."""
    if config.mode == "coefficients":
        if identity is None or start is not None:
            raise RefineInputError("mode coefficients trains the identity's own coefficients: connect hyper_lora "
                                   "and identity, and no lidb (use rank_relaxed or lidb to build on a LiDB)")
        return CoefficientLoRA(handle.core, identity, lora_prefixes(predicted), strength=config.id_strength)
    prediction = [(predicted, config.id_strength)] if predicted is not None else []
    if config.mode == "lidb":
        return _lidb(model, predicted, start, config, combine_by_rank(prediction) if prediction else None)
    if start is None and predicted is not None:
        return RankRelaxed(predicted, config.rank, seed=config.seed, strength=config.id_strength)
    terms = prediction + ([(start.lora(), 1.0)] if start is not None else [])
    if not terms:
        raise RefineInputError("mode rank_relaxed refines a starting LoRA: connect hyper_lora and identity, or a "
                               "lidb (mode lidb can start from zero)")
    return RankRelaxed(combine_by_rank(terms), config.rank, seed=config.seed, strength=1.0)


def memory_required(mp, param: Parametrisation, latents: torch.Tensor, config: RefineConfig) -> float:
    """What a run needs on the device beside the UNet's weights, for ComfyUI's model management: the
    parametrisation's tensors (the bases in coefficients mode) and ACTIVATION_FACTOR × ComfyUI's own estimate
    for one batch's forward pass."""
    shape = (config.batch, *latents.shape[1:])
    return param.device_bytes() + ACTIVATION_FACTOR * mp.memory_required(shape)


def _train(mp, param, positive, latents: torch.Tensor, config: RefineConfig, dtype, checkpointing: bool,
           ) -> list[float]:
    computes = compute_dtype(mp)
    log.info("HyperLoRA Refine: %s, %d steps, computing in %s%s.", config.mode, config.steps, computes,
             " with dynamic loss scaling" if computes == torch.float16 else "")
    pbar = comfy.utils.ProgressBar(config.steps)
    losses: list[float] = []

    def body(model_wrap, extra_args, x):
        unet = model_wrap.inner_model.diffusion_model
        with (heap_returned(x.device), frozen_by_reference(unet), casts_by_reference(unet),
              gradient_checkpointing(unet, checkpointing)):
            losses.extend(train(param, config,
                                lambda g: batch_loss(model_wrap, extra_args, x, g, config.batch, dtype),
                                on_step=lambda step, _: pbar.update_absolute(step + 1, config.steps),
                                check_interrupt=mm.throw_exception_if_processing_interrupted,
                                loss_scaling=computes == torch.float16))

    with_denoiser(mp, positive, latents, body)
    return losses


def _start(model, handle, identity, start: LiDB | None):
    """The prediction's LoRA (None without an identity), checked, with the starting LiDB, against the MODEL."""
    predicted = None
    if identity is not None:
        if handle is None:
            raise RefineInputError("identity is connected but hyper_lora is not: connect the HyperLoRA that made it")
        check_model(model, handle.core.targets)  # before any mixing
        predicted = make_lora(handle, identity, "id", key_format="comfy", release=True)  # the basis's pages
        handle.core.release_bases()  # leave as they are mixed; coefficients mode maps the bases it trains with
    if start is not None:
        check_model(model, start.targets, what="LiDB", error=LidbMismatchError)
    return predicted


def refine(model, vae, positive, handle, identity, images: torch.Tensor, config: RefineConfig, *,
           precision: str = "auto", checkpointing: bool = True, start: LiDB | None = None,
           ) -> tuple[RefineResult, list[float]]:
    """Fine-tune on the references (see HyperLoRARefine) from the identity's prediction and/or the LiDB ``start``
    (or, in mode lidb, from zero); the incoming MODEL is never patched. The result, loaded at strength 1.0, gives
    exactly the weights the last step trained with."""
    predicted = _start(model, handle, identity, start)
    device = mm.get_torch_device()
    dtype = training_dtype(precision, device)
    mp = None
    with torch.inference_mode(False), torch.enable_grad():
        try:
            latents = encode(vae, images, config)
            param = _parametrisation(handle, identity, predicted, config, model, start)
            mp = wrapped_clone(model, param)
            if dtype is not None:
                mp.set_model_compute_dtype(dtype)
            mm.load_models_gpu([mp], memory_required=memory_required(mp, param, latents, config),
                               force_full_load=True)
            param.place(device)  # after ComfyUI made room for it
            losses = _train(mp, param, positive, latents, config, dtype, checkpointing)
        finally:
            if mp is not None:
                release(mp)
                del mp
            mm.soft_empty_cache()
    return param.result(), losses
