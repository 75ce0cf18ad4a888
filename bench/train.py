"""Benchmark of HyperLoRA training: seconds per step and samples/s of each stage, beside a plain LoRA step.

    python bench/train.py                                   # toy denoiser, CPU
    COMFYUI_PATH=... python bench/train.py --backend comfy  # ComfyUI's tiny SDXL (140 attention modules), CPU
    COMFYUI_PATH=... python bench/train.py --backend comfy --size full --device cuda --precision bf16
    COMFYUI_PATH=... python bench/train.py --backend comfy --size full --device meta   # FLOP count, no GPU

The plain LoRA step trains one rank-r LoRA (the ID rank) on the same target linears of the same frozen model,
same batch and resolution: one prediction, the loss, backward, AdamW. The HyperLoRA step is the trainer's own
(``Trainer.train_step``): hypernetwork forward, mixing, the prediction with per-sample LoRAs, for stages 2 and 3
the no-grad teacher prediction of the trigger-word cases, backward, AdamW. Each time has its ratio to the plain
LoRA step beside it (the issue's goal: at most 1.3× at full size). ``full``: a random full-size SDXL UNet (fp16
weights) and a full-size hypernetwork (K=128, ID rank 8, 1.49 G basis parameters), batch 1 at 1024² (128² latents);
peak memory is torch.cuda.max_memory_allocated. The text encoder is replaced by fixed random conditioning at
full size (only the steps are timed).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hyperlora_core.train.config import TrainConfig  # noqa: E402
from hyperlora_core.train.denoiser import Batch  # noqa: E402
from hyperlora_core.train.loop import Trainer  # noqa: E402
from hyperlora_core.train.toy import SyntheticIdentities, ToyDenoiser  # noqa: E402

TINY_MODEL = dict(k=16, id_rank=4, dim=32, depth=2, heads=2, dim_head=16, id_tokens=4, clip_dim=32)


class RandomData:
    """b samples of random latents and conditions (timing only)."""

    def __init__(self, latent: tuple[int, ...], clip_dim: int, clip_tokens: int, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.latents = torch.randn(n, *latent, generator=g)
        self.clip = torch.randn(n, clip_tokens, clip_dim, generator=g)
        self.arcface = torch.nn.functional.normalize(torch.randn(n, 512, generator=g), dim=-1)

    def __len__(self) -> int:
        return len(self.latents)

    def get(self, positions):
        return Batch(self.latents[positions], ["a photo of a person"] * len(positions), self.clip[positions],
                     self.arcface[positions], self.clip[positions])


def comfy_denoiser(size: str, device: str, precision: str, *, fake: bool = False):
    """(denoiser, latent shape); ``fake``: built under FakeTensorMode (bench/train_memory.py), weights left as made."""
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        raise SystemExit("--backend comfy needs COMFYUI_PATH (a ComfyUI v0.3.64 checkout)")
    sys.path[:0] = [comfyui, str(ROOT / "tests" / "host")]
    import comfy.cli_args

    comfy.cli_args.args.cpu = device in ("cpu", "meta")
    comfy.cli_args.args.use_pytorch_cross_attention = device == "meta" or fake  # SDPA: runs on meta/fake tensors
    import comfy.model_management  # noqa: F401
    from nodepack import tiny

    from train_comfy.backend import ComfyDenoiser

    if size == "tiny":
        return ComfyDenoiser(tiny.tiny_sdxl(seed=0), tiny.tiny_clip(0), device=device, resolution=64), (4, 8, 8)
    import comfy.supported_models

    config = dict(tiny.TINY_SDXL_CONFIG, model_channels=320, context_dim=2048, adm_in_channels=2816,
                  num_head_channels=64)
    supported = comfy.supported_models.SDXL(config)
    supported.set_inference_dtype(torch.bfloat16 if precision == "bf16" else torch.float16, None)
    net = supported.get_model({}, device="meta" if device == "meta" else None)
    if device != "meta" and not fake:
        tiny.randomise(net, 0)

    class FixedText(ComfyDenoiser):
        def encode_text(self, captions):
            g = torch.Generator().manual_seed(0)
            b = len(captions)
            return {"c_crossattn": torch.randn(1, 77, 2048, generator=g).expand(b, -1, -1).to(self.device),
                    "y": torch.randn(1, 2816, generator=g).expand(b, -1).to(self.device)}

    return FixedText(tiny._patcher(net), None, device=device, resolution=1024), (4, 128, 128)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(step, n: int, device: str) -> float:
    step()  # warm-up
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def plain_lora_step(denoiser, data, batch: int, rank: int, device: str, precision: str):
    """A step of one trainable rank-r LoRA on the same targets (the baseline)."""
    g = torch.Generator().manual_seed(1)
    params = {}
    for lin in denoiser.targets.linears:
        fan_in, fan_out = lin.in_features, lin.out_features
        params[lin.key] = (
            torch.nn.Parameter((torch.randn(1, rank, fan_in, generator=g) * fan_in ** -0.5).to(device)),
            torch.nn.Parameter(torch.zeros(1, fan_out, rank, device=device)))
    optimizer = torch.optim.AdamW([p for pair in params.values() for p in pair], lr=1e-4)
    b = data.get(list(range(batch))).to(torch.device(device))
    t = torch.randint(denoiser.num_timesteps, (batch,), generator=g).to(device)
    noise = torch.randn(b.latents.shape, generator=g).to(device)

    def step():
        with torch.autocast("cpu" if device == "meta" else device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            lora = {k: (d.expand(batch, -1, -1), u.expand(batch, -1, -1)) for k, (d, u) in params.items()}
            pred = denoiser.predict(denoiser.noisy(b.latents, noise, t), t, denoiser.encode_text(b.captions), lora)
            loss = (pred.float() - denoiser.target(b.latents, noise, t).float()).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def time_steps(denoiser, data, batch: int, model: dict, device: str, precision: str, steps: int) -> list[dict]:
    """[{"step", "s" (median seconds of ``steps`` steps after a warm-up), "params" (hypernetwork parameters),
    "peak_bytes" (cuda: max_memory_allocated during that configuration, else None)}]: the plain LoRA step, then
    ``Trainer.train_step`` of stages 1, 2 and 3."""
    rank = TrainConfig().replace(model=model).model.id_rank
    cuda = device == "cuda"

    def measured(name: str, step, params: int | None) -> dict:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        seconds = _time(step, steps, device)
        return {"step": name, "s": seconds, "params": params,
                "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None}

    rows = [measured(f"plain LoRA (rank {rank})", plain_lora_step(denoiser, data, batch, rank, device, precision),
                     None)]
    with tempfile.TemporaryDirectory() as out:
        for stage in (1, 2, 3):
            config = TrainConfig().replace(model=model, stage={"stage": stage},
                                           run={"out": out, "batch": batch, "device": device,
                                                "precision": precision}, optim={"steps": 1000})
            trainer = Trainer(config, denoiser, data)
            rows.append(measured(f"HyperLoRA stage {stage}", trainer.train_step,
                                 sum(p.numel() for p in trainer.net.parameters())))
            del trainer
    return rows


def _counted(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as mode:
        fn()
    return float(mode.get_total_flops())


def count_flops(denoiser, data, batch: int, rank: int, model: dict) -> list[tuple[str, float, float, float, int]]:
    """Meta device: (step, FLOPs of forward + backward, of which hypernetwork forward, of which teacher forward,
    trainable parameters) for the plain LoRA step and each stage's loss + backward (Trainer.train_step's work
    without the optimiser). The samples' cases follow the default case_mix exactly (batch a multiple of 4)."""
    from hyperlora_core.train.stages import MATCH_BASE, MATCH_BASE_LORA, RECONSTRUCT, Draws, stage_loss

    plain_params = sum(rank * (lin.in_features + lin.out_features) for lin in denoiser.targets.linears)
    rows = [("plain LoRA", _counted(plain_lora_step(denoiser, data, batch, rank, "meta", "fp32")), 0.0, 0.0,
             plain_params)]
    b = data.get(list(range(batch))).to(torch.device("meta"))
    case = torch.tensor([RECONSTRUCT, RECONSTRUCT, MATCH_BASE, MATCH_BASE_LORA] * (batch // 4))
    draws = Draws(torch.randn(b.latents.shape, device="meta"), torch.randint(1000, (batch,), device="meta"), case)
    teach = torch.nonzero(case != RECONSTRUCT).flatten()
    with tempfile.TemporaryDirectory() as out:
        for stage in (1, 2, 3):
            config = TrainConfig().replace(model=model, stage={"stage": stage},
                                           run={"out": out, "batch": batch, "device": "meta"})
            with torch.device("meta"):
                trainer = Trainer(config, denoiser, data)
            s = trainer.stage
            hyper = _counted(lambda s=s, t=trainer: t.net(b.clip if s.id_lora else None,
                                                           b.arcface if s.reads_arcface else None, b.base_clip))
            with torch.no_grad():
                x_t = denoiser.noisy(b.latents, draws.noise, draws.t)
                rows_ = teach.to("meta")
                teacher = 0.0 if not s.id_lora else _counted(lambda x_t=x_t, r=rows_: denoiser.predict(
                    x_t[r], draws.t[r], denoiser.encode_text(b.captions[: len(teach)]), None))

            def step(trainer=trainer):
                loss, _ = stage_loss(trainer.stage, trainer.config.stage, trainer.model, denoiser, b, draws)
                loss.backward()

            trainable = sum(p.numel() for p in trainer.net.parameters() if p.requires_grad)
            rows.append((f"HyperLoRA stage {stage}", _counted(step), hyper, teacher, trainable))
            del trainer
    return rows


def print_flops(rows, batch: int, precision: str) -> None:
    plain = rows[0][1]
    print(f"comfy full (SDXL UNet at 1024², 128² latents, built from ComfyUI's classes on the meta device: nothing "
          f"runs), batch {batch}: {batch // 2} reconstruct, {batch // 4} match base, {batch // 4} match Base-LoRA "
          "(the default case_mix)")
    print("FLOP ratio, not a time ratio: matmul, convolution and attention FLOPs of forward + backward counted by "
          "torch.utils.flop_counter.FlopCounterMode; elementwise work and the optimiser are not in it")
    print(f"{'step':<20}{'TFLOP/step':>12}{'÷ plain LoRA':>14}{'hypernet fwd':>14}{'teacher fwd':>13}"
          f"{'trainable':>12}{'AdamW traffic':>15}")
    for name, flops, hyper, teacher, params in rows:
        print(f"{name:<20}{flops / 1e12:>12.2f}{flops / plain:>13.3f}×{hyper / 1e12:>14.3f}{teacher / 1e12:>13.2f}"
              f"{params / 1e6:>10.1f} M{params * 28 / 1e9:>12.1f} GB")
    print("AdamW traffic: ≈ 28 bytes per fp32 trainable parameter per step (read parameter, gradient and two moments, "
          f"write three); memory-bound, the same for any batch ({precision} autocast does not change it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=["toy", "comfy"], default="toy")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda", "meta"], default="cpu",
                        help="meta: count FLOPs instead of timing (full size without a GPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 (tiny), 1 (full)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration (median)")
    args = parser.parse_args()
    if args.size == "full" and args.backend != "comfy":
        parser.error("--size full needs --backend comfy (a full-size SDXL UNet)")
    if args.device == "meta" and (args.size, args.backend) != ("full", "comfy"):
        parser.error("--device meta counts FLOPs of --backend comfy --size full")
    batch = args.batch or (8 if args.size == "tiny" else 4 if args.device == "meta" else 1)
    if args.device == "meta" and batch % 4:
        parser.error("--device meta needs a batch that is a multiple of 4 (the default case_mix exactly)")
    if args.backend == "toy":
        denoiser, data = ToyDenoiser().requires_grad_(False), SyntheticIdentities()
        model = TINY_MODEL
    else:
        denoiser, latent = comfy_denoiser(args.size, args.device, args.precision)
        model = TINY_MODEL if args.size == "tiny" else {}
        data = RandomData(latent, model.get("clip_dim", 1024), 5 if args.size == "tiny" else 257)
    rank = TrainConfig().replace(model=model).model.id_rank
    if args.device == "meta":
        print_flops(count_flops(denoiser, data, batch, rank, model), batch, args.precision)
        return
    rows = time_steps(denoiser, data, batch, model, args.device, args.precision, args.steps)
    plain = rows[0]["s"]
    peak = (torch.cuda.max_memory_allocated() if args.device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    where = "GPU" if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{args.backend} {args.size}, {len(denoiser.targets.modules)} attention modules, batch {batch}, "
          f"{args.precision}, {where}, median of {args.steps} steps")
    print(f"{'step':<24}{'s/step':>9}{'samples/s':>11}{'÷ plain LoRA':>14}{'hypernet params':>17}")
    for row in rows:
        params = f"{row['params'] / 1e6:.2f} M" if row["params"] else "-"
        print(f"{row['step']:<24}{row['s']:>9.4f}{batch / row['s']:>11.1f}{row['s'] / plain:>13.2f}×{params:>17}")
    print(f"peak memory {peak / 2**30:.2f} GiB (" + ("torch.cuda.max_memory_allocated" if args.device == "cuda"
                                                      else "process max RSS") + ")")


if __name__ == "__main__":
    main()
