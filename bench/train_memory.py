"""Peak memory per GPU of one full-size training step, estimated without a GPU.

    COMFYUI_PATH=... python bench/train_memory.py                       # 8 ranks, stages 1-3
    COMFYUI_PATH=... python bench/train_memory.py --world 2 8 16 --stages 3

The step is the trainer's own work (stage loss with the teacher pass, backward, AdamW) on a full-size SDXL UNet
built from ComfyUI's classes with bf16 weights and a full-size hypernetwork (K=128, ID rank 8), batch 1 per rank at
1024², bf16 autocast, gradient checkpointing of the UNet blocks. Nothing is computed: every tensor is a fake tensor
(torch's FakeTensorMode), the N ranks are torch.distributed's "fake" process group, and torch's own
``FSDPMemTracker`` records the bytes alive per category at the peak of the second step (the first makes AdamW's
moments). The hypernetwork is ``fully_shard``-ed over the N ranks, as ``run --shard`` does. The frozen UNet's
weights were made before the tracker starts: they are added from its parameter sizes (the "UNet" column).

What the estimate leaves out: the CUDA caching allocator's fragmentation and the CUDA/NCCL context (together
typically 1-3 GiB); and attention runs on torch's math SDPA path here, which holds the attention matrix, where a
GPU's flash attention does not, so activation and temp figures are upper bounds. The issue's goal: at most 40 GiB
per GPU with sharding.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT.parent), str(ROOT)]

from train import RandomData, comfy_denoiser  # noqa: E402  (bench/train.py: the same full-size model)

from hyperlora_core.train.config import TrainConfig  # noqa: E402
from hyperlora_core.train.loop import Trainer  # noqa: E402
from hyperlora_core.train.stages import MATCH_BASE, MATCH_BASE_LORA, RECONSTRUCT, Draws, stage_loss  # noqa: E402

GIB = 2 ** 30


def _fake_group(world: int) -> None:
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


@contextmanager
def moves_in_place():
    """``Module.to(device)`` of a module already on that device changes nothing, but on fake tensors torch swaps
    every parameter for a copy, which FakeTensorMode's weak references forbid: skip those calls."""
    original = torch.nn.Module.to

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is None and device is not None and all(
                p.device == torch.device(device) for p in itertools.chain(self.parameters(), self.buffers())):
            return self
        return original(self, *args, **kwargs)

    torch.nn.Module.to = to
    try:
        yield
    finally:
        torch.nn.Module.to = original


@contextmanager
def real_meshes():
    """The device mesh (``run --shard``) is built from real tensors: its rank list is data the fake mode hides."""
    import torch.distributed.device_mesh as meshes
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    original = meshes.init_device_mesh

    def init_device_mesh(*args, **kwargs):
        with unset_fake_temporarily():
            return original(*args, **kwargs)

    meshes.init_device_mesh = init_device_mesh
    try:
        yield
    finally:
        meshes.init_device_mesh = original


def _cases(batch: int) -> torch.Tensor:
    """The default case_mix (1/2 reconstruct, 1/4 match base, 1/4 match Base-LoRA) for a batch of ``batch``."""
    cycle = [RECONSTRUCT, MATCH_BASE, RECONSTRUCT, MATCH_BASE_LORA]
    return torch.tensor([cycle[i % 4] for i in range(batch)])


def peak_of_step(denoiser, data, stage: int, world: int, batch: int) -> dict[str, float]:
    """{category: GiB at the peak} of one step of ``stage`` on rank 0 of ``world`` (fake tensors throughout)."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig().replace(stage={"stage": stage}, run={
            "out": out, "batch": batch * world, "device": "cpu", "precision": "bf16", "shard": world > 1,
            "gradient_checkpointing": True})
        trainer = Trainer(config, denoiser, data)
    b = data.get(list(range(batch)))
    draws = Draws(torch.randn(b.latents.shape), torch.randint(1000, (batch,)), _cases(batch))

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = stage_loss(trainer.stage, config.stage, trainer.model, denoiser, b, draws)
        loss.backward()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    step()  # the first step makes AdamW's moments; the second is measured, as every later step
    tracker = FSDPMemTracker(trainer.model, trainer.optimizer)
    tracker.track_inputs((b.latents, b.clip, b.arcface, b.base_clip))
    with tracker:
        step()
    trainable = sum(p.numel() for p in trainer.net.parameters() if p.requires_grad)
    print(f"ranks {world} stage {stage}: hypernetwork {sum(p.numel() for p in trainer.net.parameters()) / 1e9:.3f} G "
          f"parameters ({trainable / 1e9:.3f} G trained); UNet "
          f"{sum(p.numel() for p in denoiser.model.parameters()) / 1e9:.3f} G", flush=True)
    snapshot = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]
    peak = {getattr(k, "value", str(k)): v / GIB for k, v in snapshot.items()}
    peak["UNet"] = sum(p.numel() * p.element_size() for p in denoiser.model.parameters()) / GIB
    peak["Total"] += peak["UNet"]
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, nargs="+", default=[8], help="ranks (GPUs) to estimate for, each ≥ 2")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3], choices=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=1, help="samples per rank")
    args = parser.parse_args()
    if min(args.world) < 2:
        parser.error("--world: sharding needs at least 2 ranks")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    from torch._subclasses.fake_tensor import FakeTensorMode

    rows = []
    with FakeTensorMode(allow_non_fake_inputs=True), moves_in_place(), real_meshes():
        denoiser, latent = comfy_denoiser("full", "cpu", "bf16", fake=True)
        data = RandomData(latent, 1024, 257, n=max(args.batch, 4))
        for world in args.world:
            _fake_group(world)
            for stage in args.stages:
                rows.append((world, stage, peak_of_step(denoiser, data, stage, world, args.batch)))
    dist.destroy_process_group()
    print(f"full-size SDXL (bf16 weights) + full-size hypernetwork, {args.batch} sample(s) per rank at 1024², bf16 "
          "autocast, gradient checkpointing; peak bytes alive on rank 0 by torch's (FSDP)MemTracker over fake "
          "tensors (no GPU); GiB")
    names = sorted({k for _, _, peak in rows for k, v in peak.items() if k not in ("Total", "UNet") and v > 0.005})
    print(f"{'ranks':>5}{'stage':>6}{'total':>8}{'UNet':>7}  " + "  ".join(names))
    for world, stage, peak in rows:
        print(f"{world:>5}{stage:>6}{peak['Total']:>8.2f}{peak['UNet']:>7.2f}  " +
              "  ".join(f"{peak.get(n, 0.0):>{len(n)}.2f}" for n in names))
    print("goal: ≤ 40 GiB per GPU with sharding (add 1-3 GiB for the CUDA context and the allocator's slack)")


if __name__ == "__main__":
    main()
