"""The trainer's ComfyUI backend: a base model loaded by ComfyUI's own loaders, used as a library.

:class:`ComfyDenoiser` implements ``hyperlora_core.train.denoiser.Denoiser`` on a ComfyUI model: the targets are
read from the model it loads (its family and attention linears, named as our Apply node patches them); the
per-sample LoRA factors are added by forward hooks on those linears, so the frozen weights are never copied;
noising and the loss follow the model's own ``model_sampling`` (the loss is the MSE of the model output: ε for
eps models, v for v-prediction), as the refine node does. The text side (CLIP-L + CLIP-G for SDXL) is encoded
once per distinct caption and cached. Validation pictures come from ComfyUI's sampler and the model's VAE.
Letters: ``b`` samples, ``n`` tokens, ``i``/``o`` widths, ``r`` rank.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from hyperlora_core.target_scan import read_tree, scan_targets
from hyperlora_core.targets import MODEL_PREFIX, TargetLayers
from hyperlora_core.train.config import DataConfig, ValidationConfig
from hyperlora_core.train.denoiser import Batch, Factors, select

from .inplace import guard_inplace_streams

CACHE_CAPTIONS = 4096  # distinct captions whose text encoding is kept


def describe(base_model, feed_forward: bool = False) -> TargetLayers:
    """The target linears of a ComfyUI ``BaseModel``, read from the model itself (its module tree and ComfyUI's
    LoRA key map; the family is its model_config's class name): the same description Apply checks a MODEL with.
    ``feed_forward`` adds the feed-forward linears to the attention projections."""
    import comfy.lora

    return scan_targets(read_tree(base_model, comfy.lora.model_lora_keys_unet(base_model, {})),
                        feed_forward=feed_forward)


def find_targets(diffusion_model: torch.nn.Module, targets: TargetLayers) -> dict[str, torch.nn.Linear]:
    """{target key: the linear module it names} (keys are ``diffusion_model.<path>``), sizes checked."""
    named = dict(diffusion_model.named_modules())
    linears = {}
    for lin in targets.linears:
        module = named.get(lin.key.removeprefix(MODEL_PREFIX))
        if not isinstance(module, torch.nn.Linear) or (module.in_features, module.out_features) != \
                (lin.in_features, lin.out_features):
            raise ValueError(f"the base model has no {lin.in_features} -> {lin.out_features} linear at {lin.key}")
        linears[lin.key] = module
    return linears


class ComfyDenoiser:
    """A frozen ComfyUI model (``ModelPatcher``) and its text encoder (``comfy.sd.CLIP``) as a Denoiser."""

    def __init__(self, patcher, clip, *, device: torch.device | str = "cpu", resolution: int = 1024,
                 feed_forward: bool = False, vae=None) -> None:
        self.patcher, self.clip, self.resolution, self.vae = patcher, clip, resolution, vae  # vae: for sample()
        self.model = patcher.model
        self.device = torch.device(device)
        self.model.to(self.device).requires_grad_(False).eval()
        self.sampling = self.model.model_sampling
        self.num_timesteps = len(self.sampling.sigmas)
        self.targets = describe(self.model, feed_forward)  # family and linears from the model it loaded
        linears = find_targets(self.model.diffusion_model, self.targets)
        guard_inplace_streams(self.model.diffusion_model)  # Flux-style blocks add to their stream in place
        self.gradient_checkpointing = False  # recompute each UNet block's activations in backward (the trainer sets it)
        self.recomputed = 0  # block forwards run again in backward (shows the checkpointing works)
        self._lora: Factors | None = None
        self._captions: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for key, linear in linears.items():
            linear.register_forward_hook(self._hook(key))
        diffusion = self.model.diffusion_model
        for name in ("input_blocks", "middle_block", "output_blocks"):
            part = getattr(diffusion, name, None)
            for block in (part if isinstance(part, torch.nn.ModuleList) else [part] if part is not None else []):
                for layer in block.children():  # ComfyUI's UNet calls the layers of each block, not the block
                    layer.forward = self._checkpointed(layer.forward)

    def _checkpointed(self, forward):
        """A block forward that, when checkpointing is on and gradients are recorded, keeps no activations and
        recomputes them in backward with the LoRA factors of the forward it belongs to."""
        def run(*args, **kwargs):
            if not (self.gradient_checkpointing and torch.is_grad_enabled()):
                return forward(*args, **kwargs)
            lora, first = self._lora, [True]

            def body(*a, **k):
                previous, self._lora = self._lora, lora
                if not first[0]:
                    self.recomputed += 1
                first[0] = False
                try:
                    return forward(*a, **k)
                finally:
                    self._lora = previous
            return torch.utils.checkpoint.checkpoint(body, *args, use_reentrant=False, **kwargs)
        return run

    def _hook(self, key: str):
        def add_lora(module, inputs, output):
            if self._lora is None or key not in self._lora:
                return output
            down, up = self._lora[key]
            x = inputs[0]
            hidden = torch.einsum("bni,bri->bnr", x, down.to(x.dtype))
            return output + torch.einsum("bnr,bor->bno", hidden, up.to(x.dtype)).to(output.dtype)
        return add_lora

    def _encoded(self, caption: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cond [1, 77, context], pooled [1, p], y [1, adm] at the training resolution) of one caption, cached."""
        if caption not in self._captions:
            with torch.no_grad():
                cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(caption), return_pooled=True)
                side = self.resolution
                y = self.model.encode_adm(pooled_output=pooled, width=side, height=side, crop_w=0, crop_h=0,
                                          target_width=side, target_height=side)
            if len(self._captions) >= CACHE_CAPTIONS:
                self._captions.pop(next(iter(self._captions)))
            self._captions[caption] = (cond.to(self.device), pooled.to(self.device),
                                       y.to(self.device) if y is not None else None)
        return self._captions[caption]

    def encode_text(self, captions: Sequence[str]) -> dict[str, torch.Tensor]:
        """{"c_crossattn": [b, 77, context], "y": [b, adm] or None} (y: SDXL's size conditioning at the training
        resolution; None for models without one, such as SD1.5)."""
        encoded = [self._encoded(caption) for caption in captions]
        ys = [e[2] for e in encoded]
        return {"c_crossattn": torch.cat([e[0] for e in encoded]), "y": torch.cat(ys) if ys[0] is not None else None}

    def _conditioning(self, caption: str, side: int) -> list:
        """ComfyUI CONDITIONING of one caption for a side² picture (what CLIPTextEncode gives, sizes set)."""
        cond, pooled, _ = self._encoded(caption)
        return [[cond, {"pooled_output": pooled, "width": side, "height": side, "target_width": side,
                        "target_height": side}]]

    @torch.no_grad()
    def sample(self, captions: Sequence[str], lora: Factors | None, settings: ValidationConfig) -> torch.Tensor:
        """Pictures from ComfyUI's own sampler (``comfy.sample.sample``: KSampler ``settings.sampler`` /
        ``settings.scheduler``, CFG against ``settings.negative``) with the LoRA added by the hooks, decoded by the
        VAE: [b, res, res, 3] RGB in 0..1. One picture per call, so the batch-1 LoRA of picture i applies to both
        halves of a CFG batch, as a LoRA patched into the weights would."""
        import comfy.sample

        if self.vae is None:
            raise RuntimeError("sampling needs the base model's VAE: build ComfyDenoiser with vae= "
                               "(load_comfy_denoiser does)")
        side = settings.resolution // 8
        negative = self._conditioning(settings.negative, settings.resolution)
        shared = lora is None or next(iter(lora.values()))[0].shape[0] == 1
        images = []
        for i, caption in enumerate(captions):
            latent = torch.zeros(1, self.model.latent_format.latent_channels, side, side)
            noise = comfy.sample.prepare_noise(latent, settings.seed + i)
            self._lora = lora if shared else select(lora, i)
            try:
                samples = comfy.sample.sample(self.patcher, noise, settings.steps, settings.cfg, settings.sampler,
                                              settings.scheduler, self._conditioning(caption, settings.resolution),
                                              negative, latent, seed=settings.seed + i, disable_pbar=True)
            finally:
                self._lora = None
            images.append(self.vae.decode(samples).float().cpu())
        self.model.to(self.device)  # model management may have moved it while the VAE decoded; training goes on here
        return torch.cat(images)

    def _sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sampling.sigmas.to(self.device)[t.to(self.device)]

    def _out_scale(self, sigma: torch.Tensor, ndim: int) -> torch.Tensor:
        """d(denoised)/d(model output) per sample, shaped to broadcast over ``ndim``-d latents (4: images; 5: the
        [b, c, t, h, w] latents of video-VAE families such as Qwen-Image): dividing x0 errors by it gives the
        output-space error."""
        ones = torch.ones((len(sigma),) + (1,) * (ndim - 1), device=sigma.device)
        return self.sampling.calculate_denoised(sigma, ones, torch.zeros_like(ones)).abs()

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.sampling.noise_scaling(self._sigma(t), noise, self.model.process_latent_in(x0), False)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        sigma = self._sigma(t)
        clean = self.sampling.noise_scaling(torch.zeros_like(sigma), torch.zeros_like(noise),
                                            self.model.process_latent_in(x0), False)
        return clean / self._out_scale(sigma, clean.ndim)

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, context: dict[str, torch.Tensor],
                lora: Factors | None) -> torch.Tensor:
        sigma = self._sigma(t)
        self._lora = lora
        try:
            x0 = self.model.apply_model(x_t, sigma, c_crossattn=context["c_crossattn"], y=context["y"])
        finally:
            self._lora = None
        return x0 / self._out_scale(sigma, x0.ndim)


def _square(image, side: int) -> torch.Tensor:
    """Centre square of a uint8 RGB photo resized to side² -> [side, side, 3] float in 0..1."""
    from PIL import Image

    h, w = image.shape[:2]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    im = Image.fromarray(image[top: top + s, left: left + s]).resize((side, side), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, np.float32) / 255.0)


def shard_encoder(vae, clip_encoder, *, resolution: int, device: torch.device | str):
    """Prepared shard samples -> Batch: VAE latents of the photo, CLIP tokens of both crops, the stored ArcFace, and
    the ID crop's CLIP pixels (the HyperDreamBooth face encoder's input)."""
    from hyperlora_core.clip import encode_crops, preprocess
    from hyperlora_core.train.shards import decode_sample

    def encode(samples: list[dict[str, bytes]]) -> Batch:
        decoded = [decode_sample(s) for s in samples]
        face = preprocess([d["id_crop"] for d in decoded])  # CLIP's pixels of the ID crop (HyperDreamBooth's input)
        with torch.no_grad():
            latents = vae.encode(torch.stack([_square(d["image"], resolution) for d in decoded]))
            clip = clip_encoder.encode(face)
            base = encode_crops(clip_encoder, [d["base_crop"] for d in decoded])
        arcface = torch.from_numpy(np.stack([d["arcface"] for d in decoded]))
        return Batch(latents=latents.float(), captions=[d["caption"] for d in decoded], clip=clip.float(),
                     arcface=arcface, base_clip=base.float(), face=face).to(torch.device(device))

    return encode


def load_comfy_denoiser(data: DataConfig, *, device: str = "auto", precision: str = "fp32",
                        te_options: dict | None = None) -> tuple[ComfyDenoiser, object]:
    """The base model of ``data`` (a checkpoint, or a diffusion model + text encoders + VAE; ``models.py``) loaded
    by ComfyUI's own loaders: (denoiser, its VAE). ``te_options``: ComfyUI's text-encoder model_options."""
    if data.comfyui:
        sys.path.insert(0, str(Path(data.comfyui)))
    try:
        import comfy.sd  # noqa: F401
    except ImportError as exc:
        raise RuntimeError("the comfy backend imports ComfyUI as a library: set data.comfyui to a ComfyUI "
                           "checkout (or put one on PYTHONPATH)") from exc
    from .models import load_base_model

    model = load_base_model(data, precision=precision, te_options=te_options)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ComfyDenoiser(model.patcher, model.clip, device=device, resolution=data.resolution,
                         feed_forward=data.feed_forward, vae=model.vae), model.vae
