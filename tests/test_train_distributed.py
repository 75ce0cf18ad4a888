"""Distributed training on the CPU: 2 processes (gloo, launched by torchrun) give the parameters of 1 process with
the same global batch after 5 steps, for DDP and for FSDP (fully_shard of the hypernetwork and its optimiser)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[model]
k = 16
id_rank = 4
dim = 32
depth = 2
heads = 2
dim_head = 16
id_tokens = 4
clip_dim = 32
up_basis_std = 0.01
[stage]
stage = {stage}
[optim]
steps = 5
lr = 3e-3
warmup = 2
accumulation = {accumulation}
ema = 0.9
[run]
out = "{out}"
batch = 4
checkpoint_every = 5
[data]
toy_pretrain = 50
"""


def _train(tmp: Path, name: str, processes: int, accumulation: int, stage: int = 3, *extra: str) -> dict:
    out = tmp / name
    config = tmp / f"{name}.toml"
    config.write_text(CONFIG.format(out=out.as_posix(), accumulation=accumulation, stage=stage))
    command = ["-m", "hyperlora_core.train", "run", "--config", str(config), *(extra or ("--resume", ""))]
    if processes > 1:
        command = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *command]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *command], cwd=tmp, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    last = out / "step_0000005" / "weights.safetensors"
    return load_file(str(last)) if last.is_file() else {}


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """1 process, global batch 4 in 2 micro-batches of 2 (the micro-batch each of 2 ranks runs)."""
    return _train(tmp_path_factory.mktemp("single"), "single", 1, 2)


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one(single, tmp_path, mode):
    two = _train(tmp_path, mode, 2, 1, 3, "--resume", "", *(["--shard"] if mode == "fsdp" else []))
    worst = _worst(single, two)
    sys.stdout.write(f"\n{mode}: largest parameter difference, 2 processes vs 1 after 5 steps: {worst:.2e}\n")
    assert worst <= 1e-6


def test_sharded_run_interrupted_and_resumed(single, tmp_path):
    """FSDP on 2 processes stopped after step 3 (the checkpoint gathers the shards) and resumed to step 5 (each
    rank loads the full state back into its shards) ends where the uninterrupted run does."""
    _train(tmp_path, "resumed", 2, 1, 3, "--resume", "", "--shard", "--until", "3")
    assert (tmp_path / "resumed" / "step_0000003" / "optimizer.safetensors").is_file()
    resumed = _train(tmp_path, "resumed", 2, 1, 3, "--resume", "auto", "--shard")
    worst = _worst(single, resumed)
    sys.stdout.write(f"\nFSDP, 2 processes, interrupted at 3 and resumed, vs 1 process: {worst:.2e}\n")
    assert worst <= 1e-6


def test_training_moved_the_parameters(single):
    """The comparison above is not vacuous: 5 steps change the weights well beyond 1e-6."""
    from hyperlora_core.train.config import TrainConfig
    from hyperlora_core.train.hypernet import HyperNetwork
    from hyperlora_core.train.toy import ToyDenoiser

    model = TrainConfig().replace(model=dict(k=16, id_rank=4, dim=32, depth=2, heads=2, dim_head=16, id_tokens=4,
                                             clip_dim=32, up_basis_std=0.01)).model
    denoiser = ToyDenoiser()
    fresh = HyperNetwork(model, denoiser.targets).state_dict()
    assert _worst(fresh, single) > 1e-3


def test_sharded_stage_1_equals_one_process(tmp_path):
    """Stage 1 never mixes the ID bases: their FSDP unit (each basis stack is one) is never gathered, and the
    sharded run still equals one process, whose Base-LoRA moved."""
    from hyperlora_core.train.config import TrainConfig
    from hyperlora_core.train.hypernet import HyperNetwork
    from hyperlora_core.train.toy import ToyDenoiser

    one = _train(tmp_path, "single1", 1, 2, 1)
    two = _train(tmp_path, "fsdp1", 2, 1, 1, "--resume", "", "--shard")
    worst = _worst(one, two)
    model = TrainConfig().replace(model=dict(k=16, id_rank=4, dim=32, depth=2, heads=2, dim_head=16, id_tokens=4,
                                             clip_dim=32, up_basis_std=0.01)).model
    fresh = HyperNetwork(model, ToyDenoiser().targets).state_dict()
    moved = max(float((one[k] - fresh[k]).abs().max()) for k in one if k.startswith("base_bases"))
    sys.stdout.write(f"\nFSDP stage 1, 2 processes vs 1 after 5 steps: {worst:.2e} (Base bases moved {moved:.2e})\n")
    assert worst <= 1e-6 and moved > 1e-3
