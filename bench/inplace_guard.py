"""Cost of train_comfy.inplace's guard (LayerNorms read a copy of their input while gradients are recorded).

    COMFYUI_PATH=... python bench/inplace_guard.py [--rounds 5] [--steps 5]

The guard touches only the LayerNorms of stream blocks (Flux-style). On the tiny Flux (19 + 38 blocks) a plain
rank-4 LoRA training step is timed with the guard, and tried without it; on ComfyUI's tiny SDXL it counts the
LayerNorms guarded (none: its training is unchanged). Figures: median step times and their ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _bench_train():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "bench" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _layer_norms(denoiser) -> list[torch.nn.Module]:
    return [m for m in denoiser.model.diffusion_model.modules() if isinstance(m, torch.nn.LayerNorm)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        raise SystemExit("needs COMFYUI_PATH (a ComfyUI v0.3.64 checkout)")
    sys.path[:0] = [comfyui, str(ROOT), str(ROOT / "tests" / "host"), str(ROOT / "tests")]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    from nodepack import families, tiny

    from train_comfy.backend import ComfyDenoiser

    bench = _bench_train()
    sdxl = ComfyDenoiser(tiny.tiny_sdxl(seed=0), tiny.tiny_clip(0), resolution=64)
    guarded_sdxl = sum(bool(m._forward_pre_hooks) for m in _layer_norms(sdxl))
    print(f"tiny SDXL: {guarded_sdxl} of its {len(_layer_norms(sdxl))} LayerNorms guarded")

    denoiser = families_denoiser(ComfyDenoiser, families.FAMILIES["Flux"])
    norms = [m for m in _layer_norms(denoiser) if m._forward_pre_hooks]
    data = bench.RandomData((16, 8, 8), clip_dim=32, clip_tokens=4)
    step = bench.plain_lora_step(denoiser, data, args.batch, 4, "cpu", "fp32")
    guarded = statistics.median(bench._time(step, args.steps, "cpu") for _ in range(args.rounds))
    for norm in norms:
        norm._forward_pre_hooks.clear()
    try:
        unguarded = statistics.median(bench._time(step, args.steps, "cpu") for _ in range(args.rounds))
        outcome = f"{unguarded * 1e3:.1f} ms (ratio guarded / unguarded {guarded / unguarded:.3f})"
    except RuntimeError as exc:
        outcome = f"fails: {str(exc)[:70]}..."
    print(f"tiny Flux, batch {args.batch}, {len(norms)} LayerNorms guarded: step {guarded * 1e3:.1f} ms guarded; "
          f"unguarded {outcome}")


def families_denoiser(denoiser_class, family):
    """The comfy backend on a family's tiny model with fixed random text conditioning (timing only)."""

    class FixedText(denoiser_class):
        def encode_text(self, captions):
            g = torch.Generator().manual_seed(0)
            pooled = torch.randn(len(captions), family.pooled, generator=g) if family.pooled else None
            return {"c_crossattn": torch.randn(len(captions), 8, family.context, generator=g), "y": pooled}

    return FixedText(family.build(seed=0), None, resolution=64)


if __name__ == "__main__":
    main()
