"""Benchmark of HyperLoRA Refine: seconds per training step and peak memory, per mode and gradient checkpointing.

    COMFYUI_PATH=/path/to/ComfyUI python bench/refine.py [--size tiny|full] [--resolution 64] [--steps 8]

``tiny``: the host tier's 23.6 M-parameter SDXL-topology UNet (140 attention modules, real names) on the CPU.
``full``: a full-size SDXL UNet (2.6 B parameters, fp16 weights) with random weights and a full-size random
HyperLoRA (K=128, r=8), batch 1; meant for a GPU at --resolution 1024 (the goal: 50 steps in <= 20 s on an H100,
peak <= 20 GB). Each configuration runs in its own process, so peak memory is its own. The reference photos are
encoded by a stand-in encoder (pooling to the latent shape): only the training steps are timed. Every time comes
with its ratio to one inference (no-grad) forward pass of the same model and batch, measured in the same process.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("rank_relaxed", True), ("rank_relaxed", False), ("coefficients", True), ("coefficients", False)]


def _comfy(comfyui: str, device: str):
    sys.path[:0] = [comfyui, str(ROOT), str(ROOT / "tests" / "host"), str(ROOT / "tests")]
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    import comfy.model_management  # noqa: F401
    import comfy.supported_models

    return comfy


class PoolEncoder:
    """A stand-in VAE encoder: [b, h, w, 3] -> [b, 4, h/8, w/8] by a fixed projection and 8x8 pooling."""

    def encode(self, pixels):
        import torch

        x = pixels.movedim(-1, 1)
        x = torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1) * 2 - 1
        return torch.nn.functional.avg_pool2d(x, 8)


def _model_and_hyperlora(size: str, workdir: Path):
    import torch
    from nodepack import tiny

    from hyperlora_core import SDXL, UNetSpec, load_hyperlora
    from hyperlora_core.synthetic import write_checkpoint

    if size == "tiny":
        model = tiny.tiny_sdxl(seed=0)
        unet = UNetSpec(name="tiny SDXL (ComfyUI)", level_widths=(64, 128), context_dim=64)
        folder = write_checkpoint(workdir / "ckpt", unet=unet)
        cond = [[torch.randn(1, 77, 64), {"pooled_output": torch.randn(1, 32)}]]
        return model, load_hyperlora(folder, unet=unet), cond
    import comfy.supported_models

    config = dict(tiny.TINY_SDXL_CONFIG, model_channels=320, context_dim=2048, adm_in_channels=2816,
                  num_head_channels=64)
    supported = comfy.supported_models.SDXL(config)
    supported.set_inference_dtype(torch.float16, None)
    net = supported.get_model({})
    tiny.randomise(net, 0)
    folder = workdir / "ckpt"
    if not (folder / "hyper_lora_modules.safetensors").exists():
        sys.path.insert(0, str(ROOT / "bench"))
        from core import write

        write(folder)
    cond = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    return tiny._patcher(net), load_hyperlora(folder, unet=SDXL), cond


def one(args) -> dict:
    """One configuration in this process: {'step_s', 'infer_s', 'peak_bytes', ...}."""
    comfy = _comfy(args.comfyui, args.device)
    import torch

    torch.set_num_threads(args.threads)
    mm = comfy.model_management
    mode, checkpointing = args.one.split(":")
    pack = importlib.util.spec_from_file_location("hlpack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(pack)
    sys.modules["hlpack"] = module
    pack.loader.exec_module(module)
    from hlpack.hyperlora_core.refine import RefineConfig
    from hlpack.nodes import training

    model, hl, positive = _model_and_hyperlora(args.size, Path(args.workdir))
    g = torch.Generator().manual_seed(0)
    identity = hl.predict_identity(clip_tokens=torch.randn(1, 257, 1024, generator=g),
                                   id_embeds=torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1))
    handle = type("Handle", (), {"core": hl})()
    images = torch.rand(1, args.resolution, args.resolution, 3, generator=g)
    config = RefineConfig(mode=mode, steps=args.steps, lr=1e-3, seed=0, batch=1, resolution=args.resolution)

    stamps: list[float] = []
    real_check = mm.throw_exception_if_processing_interrupted

    def stamp():
        if mm.get_torch_device().type == "cuda":
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        real_check()

    mm.throw_exception_if_processing_interrupted = stamp
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result, losses = training.refine(model, PoolEncoder(), positive, handle, identity, images, config,
                                     checkpointing=checkpointing == "ckpt")
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # the first step warms up
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)

    # one inference forward pass of the same model on the same kind of batch, for the ratio
    latents = training.encode(PoolEncoder(), images, RefineConfig(resolution=args.resolution, augment=False))
    infer: list[float] = []

    def body(model_wrap, extra_args, x):
        with torch.no_grad():
            for i in range(4):
                t0 = time.perf_counter()
                training.batch_loss(model_wrap, extra_args, x, torch.Generator().manual_seed(i), 1, None)
                if x.device.type == "cuda":
                    torch.cuda.synchronize()
                infer.append(time.perf_counter() - t0)

    with torch.inference_mode(False):
        training.with_denoiser(model, positive, latents, body)
    return {"mode": mode, "checkpointing": checkpointing == "ckpt", "step_s": statistics.median(steps),
            "infer_s": statistics.median(infer[1:]), "peak_bytes": peak, "setup_rss_bytes": rss0,
            "first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny), 1024 (full)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.comfyui:
        parser.error("set COMFYUI_PATH (or --comfyui) to a ComfyUI v0.3.64 checkout")
    args.resolution = args.resolution or (64 if args.size == "tiny" else 1024)
    if args.one:
        sys.stdout.write(json.dumps(one(args)) + "\n")
        return
    workdir = args.workdir or tempfile.mkdtemp(prefix="hl_refine_bench_")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for mode, ckpt in CONFIGS:
        cmd = [sys.executable, __file__, "--comfyui", args.comfyui, "--size", args.size, "--device", args.device,
               "--resolution", str(args.resolution), "--steps", str(args.steps), "--threads", str(args.threads),
               "--workdir", workdir, "--one", f"{mode}:{'ckpt' if ckpt else 'nockpt'}"]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.stderr.write(out.stderr[-3000:])
            raise SystemExit(f"{mode} checkpointing={ckpt} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    where = "GPU" if args.device == "cuda" else f"CPU, {args.threads} threads"
    sys.stdout.write(f"HyperLoRA Refine, {args.size} SDXL-topology UNet, {args.resolution}² px, batch 1, {where}, "
                     f"median of {args.steps - 2} steps\n")
    sys.stdout.write(f"{'mode':<14}{'checkpointing':<15}{'s/step':>9}{'÷ inference':>13}{'50 steps':>10}"
                     f"{'peak':>11}{'÷ no-ckpt peak':>16}\n")
    for row in rows:
        base = next(r for r in rows if r["mode"] == row["mode"] and not r["checkpointing"])
        sys.stdout.write(f"{row['mode']:<14}{str(row['checkpointing']):<15}{row['step_s']:>9.3f}"
                         f"{row['step_s'] / row['infer_s']:>12.1f}×{50 * row['step_s']:>9.1f}s"
                         f"{row['peak_bytes'] / 2**30:>9.2f}GiB{row['peak_bytes'] / base['peak_bytes']:>15.2f}×\n")
    sys.stdout.write("peak: " + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
                                 "the process's max RSS (interpreter, ComfyUI and model included)") + "\n")


if __name__ == "__main__":
    main()
