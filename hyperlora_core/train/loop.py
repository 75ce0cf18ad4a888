"""The training loop: one stage of one run, on one process or under torchrun (DDP, or FSDP with ``run.shard``).

A step's samples are positions ``step·batch … step·batch + batch − 1`` of a seeded per-epoch permutation; each
rank takes its slice of every accumulation micro-batch, and each sample's noise, timestep and case are drawn
from (seed, step, position) alone. Hence 1 process and N processes see the same global batch, and a resumed run
repeats the steps it would have taken. A training checkpoint is a folder ``step_<n>`` with the hypernetwork,
the optimiser state (and the EMA) as safetensors and ``state.json`` holding the step and the whole config.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from ..errors import CheckpointFormatError, HyperLoRAError
from ..targets import TargetLayers, released_target_layers
from ..topology import UNetSpec, resolve
from .config import TrainConfig, TrainConfigError
from .denoiser import Batch, Denoiser
from .hypernet import BasisStack, HyperNetwork
from .stages import STAGES, draw

log = logging.getLogger(__name__)
STATE_FILE = "state.json"
FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


class ResumeError(HyperLoRAError, ValueError):
    """A training checkpoint cannot be resumed with this config."""


class Dataset(Protocol):
    def __len__(self) -> int: ...

    def get(self, positions: list[int]) -> Batch: ...


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class Trainer:
    """Trains ``config.stage`` of a HyperNetwork on ``denoiser`` with ``data``; see the module docstring."""

    def __init__(self, config: TrainConfig, denoiser: Denoiser, data: Dataset, *,
                 validate: Callable[[HyperNetwork], dict[str, float]] | None = None) -> None:
        self.config, self.denoiser, self.data, self.validate_fn = config, denoiser, data, validate
        self.stage = STAGES[config.stage.stage]
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        run, optim = config.run, config.optim
        if run.batch % (optim.accumulation * self.world):
            raise TrainConfigError(f"run.batch={run.batch} must be a multiple of optim.accumulation × processes = "
                                   f"{optim.accumulation} × {self.world}")
        self.micro = run.batch // (optim.accumulation * self.world)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if run.device == "auto"
                                   else run.device)
        if hasattr(denoiser, "gradient_checkpointing"):
            denoiser.gradient_checkpointing = run.gradient_checkpointing
        self.net = self.stage.build(config, denoiser).to(self.device)
        if config.stage.init:
            self.net.load_state_dict(read_weights(Path(config.stage.init)), strict=True)
        trainable = {id(p) for g in self.stage.trains for p in self.net.groups()[g]}
        for p in self.net.parameters():
            p.requires_grad_(id(p) in trainable)
        self.names = [n for n, p in self.net.named_parameters() if p.requires_grad]
        if not self.names:
            raise TrainConfigError(f"stage {self.stage.number} has nothing to train (model.base is off?)")
        self.model = self._wrap()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay)
        self.ema = {n: p.detach().clone() for n, p in self.net.named_parameters() if p.requires_grad} \
            if optim.ema else None
        self.step = 0
        self.out = Path(run.out)
        self.writer = None
        self.last_stats: dict[str, float] = {}
        self.history: list[dict[str, float]] = []  # everything logged, with its step (rank 0)

    def _wrap(self) -> torch.nn.Module:
        if self.world == 1:
            return self.net
        if self.config.run.shard:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.world,))
            # each basis stack (most of the parameters) is its own unit, gathered only while it mixes and freed
            # after: the whole network never exists unsharded at once
            for stack in [m for m in self.net.modules() if isinstance(m, BasisStack)]:  # none in stage "hdb"
                fully_shard(stack, mesh=mesh)
            return fully_shard(self.net, mesh=mesh)
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- data -------------------------------------------------------------------------------------------------
    def positions(self, step: int, micro: int) -> tuple[list[int], list[int]]:
        """(dataset indices, stream positions) of this rank's part of micro-batch ``micro`` of step ``step``."""
        run = self.config.run
        start = step * run.batch + micro * self.micro * self.world + self.rank * self.micro
        n = len(self.data)
        out = []
        for g in range(start, start + self.micro):
            epoch, i = divmod(g, n)
            out.append(int(_permutation(n, run.seed, epoch)[i]))
        return out, list(range(start, start + self.micro))

    # -- one optimiser step -------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        config, stats = self.config, {}
        accum = config.optim.accumulation
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=config.run.precision == "bf16")
        for m in range(accum):
            index, slots = self.positions(self.step, m)
            batch = self.data.get(index).to(self.device)
            draws = draw(config.run.seed, self.step, slots, tuple(batch.latents.shape[1:]),
                         self.denoiser.num_timesteps, config.stage.case_mix)
            draws.noise, draws.t = draws.noise.to(self.device), draws.t.to(self.device)
            with self._sync(m == accum - 1), autocast:
                loss, part = self.stage.loss(config, self.model, self.denoiser, batch, draws)
                (loss / accum).backward()
            for k, v in part.items():  # tensors (stages 1-3) or floats
                stats[k] = stats.get(k, 0.0) + (v.float() if isinstance(v, torch.Tensor) else float(v)) / accum
        lr = config.optim.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if config.optim.grad_clip:
            stats["grad_norm"] = _local(torch.nn.utils.clip_grad_norm_(
                [p for p in self.model.parameters() if p.requires_grad], config.optim.grad_clip)).float()
        tensors = {k: v for k, v in stats.items() if isinstance(v, torch.Tensor)}
        if tensors:  # read back in one device sync
            stats.update(zip(tensors, torch.stack(list(tensors.values())).tolist(), strict=True))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            with torch.no_grad():
                for n, p in self.net.named_parameters():
                    if n in self.ema:
                        self.ema[n].lerp_(p.detach(), 1 - config.optim.ema)
        self.step += 1
        stats["lr"] = lr
        return stats

    def _sync(self, last: bool):
        if self.world == 1 or last:
            if self.config.run.shard and self.world > 1:
                self.model.set_requires_gradient_sync(True)
            return nullcontext()
        if self.config.run.shard:
            self.model.set_requires_gradient_sync(False)
            return nullcontext()
        return self.model.no_sync()

    # -- the run ------------------------------------------------------------------------------------------------
    def train(self, until: int | None = None, progress: bool = True) -> dict[str, float]:
        """Run optimiser steps up to ``until`` (default: optim.steps), with checkpoints, logs and validation."""
        run, stop = self.config.run, min(until or self.config.optim.steps, self.config.optim.steps)
        bar = _progress_bar(stop, self.step) if progress and self.rank == 0 else None
        started, first = time.perf_counter(), self.step
        while self.step < stop:
            self.last_stats = self.train_step()
            if self.step % run.log_every == 0 or self.step == stop:
                rate = (self.step - first) * run.batch / max(1e-9, time.perf_counter() - started)
                self.log({**self.last_stats, "samples_per_s": rate})
                if bar is not None:
                    bar.set_postfix(loss=f"{self.last_stats['loss']:.4f}", samples_s=f"{rate:.1f}")
            if bar is not None:
                bar.update(1)
            if run.validate_every and self.validate_fn and self.step % run.validate_every == 0:
                self.validate()
            if self.step % run.checkpoint_every == 0 or self.step == self.config.optim.steps:
                self.save()
        if self.step > first and self.step % run.checkpoint_every and self.step < self.config.optim.steps:
            self.save()  # stopped early (``until``): a later run resumes from here
        if bar is not None:
            bar.close()
        if self.writer:
            self.writer.flush()
        return self.last_stats

    def validate(self) -> dict[str, float]:
        """Run the validation function on the full (EMA) weights, on rank 0; logged as val/<name>."""
        weights = self.full_weights()
        if self.rank != 0:
            return {}
        net = self.stage.build(self.config, self.denoiser, init=False).to(self.device)
        net.load_state_dict(weights, strict=True)
        with torch.no_grad():
            values = {f"val/{k}": v for k, v in self.validate_fn(net.eval()).items()}
        self.log(values)
        return values

    def log(self, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        self.history.append({"step": self.step, **values})
        if self.writer is None:
            self.writer = _writer(self.out / "logs")
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, self.step)
        log.info("step %d %s", self.step, " ".join(f"{k}={v:.5g}" for k, v in values.items()))

    # -- checkpoints --------------------------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
        """(full weights, flat optimiser tensors, optimiser param groups) on rank 0 (empty on the others)."""
        weights, optim = get_state_dict(self.model, self.optimizer, options=FULL)
        flat = {f"{fqn}::{k}": v for fqn, s in optim.get("state", {}).items() for k, v in s.items()}
        return weights, flat, optim.get("param_groups", [])

    def save(self) -> Path:
        weights, flat, groups = self.state()
        ema = {n: _local(t).cpu() for n, t in self.ema.items()} if self.ema is not None else None
        folder = self.out / f"step_{self.step:07d}"
        if self.rank == 0:
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
            save_file({k: v.contiguous() for k, v in flat.items()}, str(tmp / "optimizer.safetensors"))
            if ema is not None:
                save_file(ema, str(tmp / "ema.safetensors"))
            (tmp / STATE_FILE).write_text(json.dumps({
                "step": self.step, "config": self.config.to_dict(), "param_groups": groups,
                "targets": self.denoiser.targets.to_json(),
            }, indent=1))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
            for old in sorted(self.out.glob("step_*[0-9]"))[: -self.config.run.keep]:
                shutil.rmtree(old)
            log.info("saved %s", folder)
        if self.world > 1:
            dist.barrier()
        return folder

    def resume(self, folder: str | Path) -> None:
        """Continue from a training checkpoint of this stage: weights, optimiser, EMA and step."""
        folder = Path(folder)
        state = json.loads((folder / STATE_FILE).read_text())
        saved = TrainConfig.from_dict(state["config"], where=str(folder / STATE_FILE))
        for section in ("model", "stage", "hdb", "lidb"):
            if getattr(saved, section) != getattr(self.config, section):
                raise ResumeError(f"'{folder}' was trained with a different [{section}] section; resume it with "
                                  f"its own config (stored in {folder / STATE_FILE})")
        flat = load_file(str(folder / "optimizer.safetensors"))
        optim_state: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            fqn, name = key.split("::")
            optim_state.setdefault(fqn, {})[name] = value
        set_state_dict(self.model, self.optimizer, model_state_dict=read_weights(folder),
                       optim_state_dict={"state": optim_state, "param_groups": state["param_groups"]}, options=FULL)
        if self.ema is not None and (folder / "ema.safetensors").exists():
            ema = load_file(str(folder / "ema.safetensors"))
            for n, t in self.ema.items():
                t.copy_(_shard_like(ema[n], t))
        self.step = int(state["step"])

    def full_weights(self, ema: bool = True) -> dict[str, torch.Tensor]:
        """The whole hypernetwork's weights (the EMA where there is one and ``ema``) on rank 0; call on all ranks."""
        weights = get_model_state_dict(self.model, options=FULL) if self.world > 1 else \
            {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}
        if ema and self.ema is not None:
            averaged = {n: _local(t).detach().cpu() for n, t in self.ema.items()}  # collective under FSDP
            if self.rank == 0:
                weights.update(averaged)
        return weights


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)
    return full.to(like.device)


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """The hypernetwork weights of a training checkpoint (a step_<n> folder)."""
    path = Path(folder) / "weights.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"training checkpoint '{folder}' has no weights.safetensors; give a step_<n> folder "
                                "written by python -m hyperlora_core.train run")
    return load_file(str(path))


def stored_targets(state: dict, where: str) -> TargetLayers:
    """The target layers a training checkpoint's state.json (``where``) records.

    Today's trainer stores them whole under "targets" (TargetLayers.to_json). Checkpoints of the first trainer hold
    "targets" as the SGM names of SDXL attention modules, in token order, and "unet" (a UNetSpec: name,
    level_widths, context_dim): their layers are those modules' four linears at those widths, which is what
    released_target_layers makes of a released module list (sdxl_target_layers, for all 140 modules in SGM order).
    """
    targets, unet = state.get("targets"), state.get("unet")
    if isinstance(targets, dict):
        return TargetLayers.from_json(targets, where)
    if isinstance(targets, list) and isinstance(unet, dict):
        try:
            spec = UNetSpec(str(unet["name"]), tuple(int(w) for w in unet["level_widths"]), int(unet["context_dim"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointFormatError(f"'{where}': its \"unet\" entry {unet!r} is no UNet description ({exc}). "
                                        "The file was edited or damaged; use the one the trainer wrote.") from exc
        modules = [resolve(str(name)) for name in targets]
        if None in modules:
            unknown = targets[modules.index(None)]
            raise CheckpointFormatError(f"'{where}': \"targets\" lists {unknown!r}, which is no SDXL attention "
                                        "module. The file was edited or damaged; use the one the trainer wrote.")
        return released_target_layers(modules, spec)
    raise CheckpointFormatError(
        f"'{where}' does not record the layers the hypernetwork was trained for (no \"targets\" description): an "
        "early trainer wrote it. Export it through its run instead, which reads them from the run's base model: "
        "python -m hyperlora_core.train run --config <the run's TOML> --resume <this step folder> --steps <its "
        f"step, {state.get('step')}> --export <folder to write>.")


def latest_checkpoint(out: str | Path) -> Path | None:
    found = sorted(Path(out).glob("step_*[0-9]"))
    return found[-1] if found else None


def _writer(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.warning("TensorBoard logs are off: the tensorboard package is not installed (pip install tensorboard); "
                    "metrics go to the log only")
        return False
    return SummaryWriter(str(folder))


def _progress_bar(total: int, done: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)
