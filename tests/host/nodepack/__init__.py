"""A test-only ComfyUI node pack (V1 API): tiny models from ComfyUI's own classes and synthetic face photos.

The host tier links this folder into a throw-away ``custom_nodes/`` beside the real package; it is never shipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = str(Path(__file__).resolve().parents[2])  # tests/, for face_doubles
_ROOT = str(Path(__file__).resolve().parents[3])  # the repository, for hyperlora_core (appended: ComfyUI's own
for _path in (_TESTS, _ROOT):  # modules, e.g. its nodes.py, keep their names)
    if _path not in sys.path:
        sys.path.append(_path)

from . import families, faults, tiny  # noqa: E402
from .base import CATEGORY, SEED, AlwaysRunsOutput, SeededBuilder, save_output  # noqa: E402


class HLTestTinySDXL:
    """SDXL (140 attention modules, SDXL names) at model_channels 32: attention widths 64/128, context 64."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": SEED,
                             "model_channels": ("INT", {"default": 32, "min": 32, "max": 64, "step": 32,
                                                        "tooltip": "32 fits the tiny HyperLoRA; others differ"})}}

    def build(self, seed, model_channels):
        return (tiny.tiny_sdxl(seed, model_channels),)


class HLTestTinySD15(SeededBuilder):
    """SD1.5 (comfy.supported_models.SD15) at tiny widths, context 64: the wrong base model for an SDXL LoRA."""

    RETURN_TYPES = ("MODEL",)
    make = staticmethod(tiny.tiny_sd15)


class HLTestTinyCLIP(SeededBuilder):
    """SDXL's text encoders (clip_l + clip_g, real tokenizers) at width 32: context [1, 77, 64], pooled [1, 32]."""

    RETURN_TYPES = ("CLIP",)
    make = staticmethod(tiny.tiny_clip)


class HLTestTinyVAE(SeededBuilder):
    """A TAESD-shaped VAE with random weights, loaded by comfy.sd.VAE as the stock VAELoader would."""

    RETURN_TYPES = ("VAE",)
    make = staticmethod(tiny.tiny_vae)


class HLTestTinyControlNet(SeededBuilder):
    """A CONTROL_NET for the tiny SDXL: what ControlNetLoader gives for an SDXL ControlNet, at tiny widths."""

    RETURN_TYPES = ("CONTROL_NET",)
    make = staticmethod(tiny.tiny_controlnet)


class HLTestFaceImage:
    """A 640x640 dark photo with a painted face the antelopev2 doubles detect (or none, with face=False)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": SEED, "face": ("BOOLEAN", {"default": True, "tooltip": "paint a face"})}}

    def build(self, seed, face):
        return (tiny.face_photo(seed, face),)


class HLTestDumpWeights(AlwaysRunsOutput):
    """Write the model's attention weights (the 560 LoRA targets) to output/<name>.safetensors.

    load True: through ComfyUI's model management first (load_models_gpu applies the MODEL's patches in place, as
    before sampling); False: the module as it is now. ``after`` only orders this node after a sampler.
    """

    FUNCTION = "dump"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "the model to read"}),
                             "name": ("STRING", {"default": "weights", "tooltip": "file name under output/"}),
                             "load": ("BOOLEAN", {"default": True, "tooltip": "apply the patches first"})},
                "optional": {"after": ("LATENT", {"tooltip": "run after the node giving this"})}}

    def dump(self, model, name, load, after=None):
        import comfy.model_management

        if load:
            comfy.model_management.load_models_gpu([model], force_full_load=True)
        sd = model.model.diffusion_model.state_dict()
        weights = {k: v.detach().float().cpu().clone() for k, v in sd.items() if tiny.is_lora_target(k)}
        meta = {"patches": str(len(model.patches)), "patched_targets": str(sum(
            1 for k in model.patches if tiny.is_lora_target(k.removeprefix("diffusion_model."))))}
        return save_output(name, weights, meta)


class HLTestRecordWeights:
    """MODEL -> MODEL whose every UNet call saves one weight (``key``), the batch's cond_or_uncond and sigma to
    output/<name>/call_<n>.safetensors; before.safetensors holds the weight when this node ran."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wrap"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL", {"tooltip": "the model to watch"}),
                             "key": ("STRING", {"default": tiny.WATCHED_KEY, "tooltip": "diffusion_model weight"}),
                             "name": ("STRING", {"default": "calls", "tooltip": "folder under output/"})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def wrap(self, model, key, name):
        import folder_paths
        import safetensors.torch

        folder = Path(folder_paths.get_output_directory()) / name
        folder.mkdir(parents=True, exist_ok=True)
        module = model.model.diffusion_model
        safetensors.torch.save_file({"weight": module.get_parameter(key).detach().float().clone()},
                                    str(folder / "before.safetensors"))
        calls = []

        def recorder(apply_model, args):
            meta = {"cond_or_uncond": ",".join(map(str, args["cond_or_uncond"])),
                    "sigma": repr(float(args["timestep"].flatten()[0]))}
            safetensors.torch.save_file({"weight": module.get_parameter(key).detach().float().clone()},
                                        str(folder / f"call_{len(calls):03d}.safetensors"), metadata=meta)
            calls.append(meta)
            return apply_model(args["input"], args["timestep"], **args["c"])

        patched = model.clone()
        patched.set_model_unet_function_wrapper(recorder)
        return (patched,)


class HLTestLoadedModels(AlwaysRunsOutput):
    """Report ComfyUI's loaded models (class, bytes) and this process's RSS; always re-runs."""

    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"tag": ("STRING", {"default": "", "tooltip": "any text, shown back"})},
                "optional": {"after": ("LATENT", {"tooltip": "run after the node giving this"})}}

    def report(self, tag, after=None):
        import gc

        import comfy.model_management as mm
        import psutil

        gc.collect()
        models = []
        for lm in mm.current_loaded_models:
            inner = lm.model.model if lm.model is not None else None
            kind = type(inner)
            models.append({"class": f"{kind.__module__}.{kind.__qualname__}", "bytes": int(lm.model_memory())})
        return {"ui": {"report": [{"tag": tag, "models": models, "rss": psutil.Process().memory_info().rss}]}}


class HLTestHyperLoRAState(AlwaysRunsOutput):
    """Report what a HYPER_LORA holds now and how often each part was built (its ``loaded()``), and how many of
    ComfyUI's loaded models are not ComfyUI's own classes (ours); always re-runs."""

    FUNCTION = "report"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"hyper_lora": ("HYPER_LORA", {"tooltip": "the HyperLoRA to look at"})},
                "optional": {"after": ("LATENT", {"tooltip": "run after the node giving this"})}}

    def report(self, hyper_lora, after=None):
        import gc

        import comfy.model_management as mm

        gc.collect()
        ours = [lm for lm in mm.current_loaded_models
                if lm.model is not None and not type(lm.model.model).__module__.startswith("comfy.")]
        return {"ui": {"state": [{**hyper_lora.loaded(), "managed": len(ours)}]}}


NODE_CLASS_MAPPINGS = {cls.__name__: cls for cls in (
    HLTestTinySDXL, HLTestTinySD15, HLTestTinyCLIP, HLTestTinyVAE, HLTestTinyControlNet, HLTestFaceImage,
    HLTestDumpWeights, HLTestRecordWeights, HLTestLoadedModels, HLTestHyperLoRAState)}
NODE_CLASS_MAPPINGS |= faults.NODE_CLASS_MAPPINGS | families.NODE_CLASS_MAPPINGS
