"""One GPU check of the whole pack at real size: predict + mix, sampling with and without an identity, Refine.

    python bench/gpu_check.py --comfyui .device/ComfyUI [--json gpu_check.json]        # H100/H200: ~5 min
    python bench/gpu_check.py --comfyui PATH --size tiny --device cpu                   # same code, seconds

Everything it needs it makes itself: a full-size random SDXL UNet (2.57 G parameters, fp16, built inside
``torch.inference_mode()`` as ComfyUI loads models) and a full-size random HyperLoRA (K=128, r=8, fp16, 3.1 GB
written to --workdir). It imports only torch, safetensors, ComfyUI (the v0.3.64 snapshot) and this checkout.
Reported, one table (and --json):

* predict + mix: coefficient tokens from 1 and 4 photos' conditions (random CLIP tokens and ArcFace embeddings:
  the encoders are not timed) and the 560 mixed LoRA pairs, fp16;
* sampling: s/step of ComfyUI's sampler (euler, cfg 5) at 1024² without and with the identity applied at 0.85
  (ComfyUI patches the weights once; the ratio should be 1.00);
* HyperLoRA Refine at 1024², 50 steps, batch 1, each mode, gradient checkpointing on and off: seconds and
  ``torch.cuda.max_memory_allocated`` (the process's max RSS on the CPU);
* training (bench/train.py's comparison): s/step of a plain rank-8 LoRA step and of Trainer.train_step in stages
  1-3 at 1024², batch 1, bf16, with each one's ratio to the plain step (the goal: at most 1.3×) and its
  ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refine import CONFIGS, build, comfy_modules, pack_modules, predicted_identity, run_refine  # noqa: E402

SIZES = {  # size -> sampling steps timed, refine steps, resolution, photos for predict + mix, training batch/steps
    "full": {"sample_steps": 8, "refine_steps": 50, "resolution": 1024, "photos": (1, 4), "train_batch": 1,
             "train_steps": 3},
    "tiny": {"sample_steps": 2, "refine_steps": 2, "resolution": 64, "photos": (1, 4), "train_batch": 2,
             "train_steps": 1},
}


NEEDS = ("torch", "safetensors", "numpy", "PIL", "einops", "scipy", "torchsde", "av", "yaml", "psutil", "tqdm")


def missing_modules() -> list[str]:
    """What ComfyUI's sampling and node modules import that this Python lacks (carry them as wheels)."""
    import importlib.util

    return [name for name in NEEDS if importlib.util.find_spec(name) is None]


class Clock:
    def __init__(self, device: str) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def time(self, fn, repeat: int = 3) -> float:
        """Median seconds of ``repeat`` calls after one warm-up call."""
        fn()
        times = []
        for _ in range(repeat):
            self.sync()
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


def peak_reset(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> int:
    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def predict_and_mix(hl, clock: Clock, photos: int) -> float:
    def run():
        identity = predicted_identity(hl, photos)
        hl.identity_to_lora(identity, key_format="comfy", dtype=hl.dtype)
    return clock.time(run)


def sample_step_seconds(comfy, model, positive, negative, side: int, steps: int, clock: Clock):
    """(median s/step of steps 2.., the final latent) for one seeded sampling run."""
    import comfy.sample
    import torch

    latent = torch.zeros(1, 4, side // 8, side // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    stamps: list[float] = []

    def callback(step, x0, x, total):
        clock.sync()
        stamps.append(time.perf_counter())

    clock.sync()
    stamps.append(time.perf_counter())
    out = comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                              callback=callback, disable_pbar=True, seed=0)
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(times[1:] or times), out


def run(args) -> dict:
    comfy = comfy_modules(args.comfyui, args.device)
    import torch

    refine_mod, training = pack_modules()
    from hlpack.nodes.apply import apply_identity

    size = SIZES[args.size]
    clock = Clock(args.device)
    t0 = time.perf_counter()
    model, hl, positive = build(args.size, Path(args.workdir))
    pooled = positive[0][1]["pooled_output"]
    negative = [[torch.zeros_like(positive[0][0]), {"pooled_output": torch.zeros_like(pooled)}]]
    fp16 = torch.float16 if args.device == "cuda" else torch.float32  # fp16 matmuls crawl on a CPU
    from hyperlora_core import load_hyperlora

    hl = load_hyperlora(hl.checkpoint.folder, unet=None, device=torch.device(args.device), dtype=fp16)
    report: dict = {"size": args.size, "device": args.device, "setup_s": time.perf_counter() - t0,
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None}
    report["dtype"] = str(hl.dtype).removeprefix("torch.")
    report["predict_mix_s"] = {str(n): predict_and_mix(hl, clock, n) for n in size["photos"]}

    handle = type("Handle", (), {"core": hl})()
    side = size["resolution"]
    plain, plain_out = sample_step_seconds(comfy, model, positive, negative, side, size["sample_steps"], clock)
    patched = apply_identity(model, handle, predicted_identity(hl), 0.85)
    with_id, id_out = sample_step_seconds(comfy, patched, positive, negative, side, size["sample_steps"], clock)
    comfy.model_management.unload_all_models()
    report["sampling"] = {"s_per_step": plain, "s_per_step_with_identity": with_id, "ratio": with_id / plain,
                          "identity_changes_the_image": float((id_out - plain_out).abs().max()) > 0}

    images = torch.rand(1, side, side, 3, generator=torch.Generator().manual_seed(0))
    report["refine"] = []
    for mode, checkpointing in CONFIGS:
        peak_reset(args.device)
        row = run_refine(training, refine_mod, model, hl, positive, images, mode, checkpointing,
                         size["refine_steps"], "auto", clock.sync)
        lora = row.pop("lora")
        row.update(mode=mode, checkpointing=checkpointing, peak_bytes=peak(args.device), lora_pairs=len(lora) // 3)
        report["refine"].append(row)
        comfy.model_management.unload_all_models()
    del model, patched
    comfy.model_management.unload_all_models()
    report["training"] = training_steps(args.size, args.device)
    report["total_s"] = time.perf_counter() - t0
    return report


def training_steps(size: str, device: str) -> dict:
    """bench/train.py's comparison at this size: a plain LoRA step and Trainer.train_step of stages 1-3 on a
    random SDXL UNet (bf16 on the GPU; full size: 1024², the released hypernetwork sizes)."""
    import train as train_bench

    precision = "bf16" if device == "cuda" else "fp32"
    denoiser, latent = train_bench.comfy_denoiser(size, device, precision)
    model = train_bench.TINY_MODEL if size == "tiny" else {}
    data = train_bench.RandomData(latent, model.get("clip_dim", 1024), 5 if size == "tiny" else 257)
    batch = SIZES[size]["train_batch"]
    rows = train_bench.time_steps(denoiser, data, batch, model, device, precision, SIZES[size]["train_steps"])
    return {"batch": batch, "precision": precision, "rows": rows}


def table(r: dict) -> str:
    gib = 2 ** 30
    where = r["gpu"] or r["device"]
    memory = "max_memory_allocated" if r["device"] == "cuda" else "max RSS"
    one = r["predict_mix_s"]["1"]
    lines = [f"HyperLoRA GPU check ({r['size']} models, {where}); setup {r['setup_s']:.0f} s, total "
             f"{r['total_s']:.0f} s",
             f"predict + mix ({r['dtype']}): " + ", ".join(f"{n} photo(s) {s * 1000:.0f} ms ({s / one:.2f}× one photo)"
                                                   for n, s in r["predict_mix_s"].items()),
             f"sampling: {r['sampling']['s_per_step']:.3f} s/step plain, "
             f"{r['sampling']['s_per_step_with_identity']:.3f} s/step with an identity "
             f"(ratio {r['sampling']['ratio']:.2f})",
             f"{'refine mode':<14}{'ckpt':<6}{'steps':>6}{'seconds':>9}{'s/step':>8}{'÷ no-ckpt':>11}"
             f"{memory:>22}{'÷ no-ckpt':>11}"]
    for row in r["refine"]:
        base = next(b for b in r["refine"] if b["mode"] == row["mode"] and not b["checkpointing"])
        lines.append(f"{row['mode']:<14}{'on' if row['checkpointing'] else 'off':<6}{row['steps']:>6}"
                     f"{row['total_s']:>9.1f}{row['step_s']:>8.3f}{row['step_s'] / base['step_s']:>10.2f}×"
                     f"{row['peak_bytes'] / gib:>18.2f} GiB{row['peak_bytes'] / base['peak_bytes']:>10.2f}×")
    train = r["training"]
    plain = train["rows"][0]["s"]
    lines.append(f"{'training step':<24}{'s/step':>9}{'samples/s':>11}{'÷ plain LoRA':>14}{memory:>22}   "
                 f"(batch {train['batch']}, {train['precision']})")
    for row in train["rows"]:
        held = f"{row['peak_bytes'] / gib:.2f} GiB" if row["peak_bytes"] is not None else "-"
        lines.append(f"{row['step']:<24}{row['s']:>9.3f}{train['batch'] / row['s']:>11.2f}{row['s'] / plain:>13.2f}×"
                     f"{held:>22}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI v0.3.64 checkout")
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--workdir", default=None, help="where the random HyperLoRA is written (3.1 GB when full)")
    parser.add_argument("--json", default=None, help="also write the report here")
    args = parser.parse_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="hl_gpu_check_")
    missing = missing_modules()
    if missing:
        parser.error(f"this Python lacks {', '.join(missing)}: install their wheels (see README, 'GPU check')")
    report = run(args)
    sys.stdout.write(table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
