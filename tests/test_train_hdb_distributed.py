"""HyperDreamBooth under torchrun on the CPU (gloo): LiDB pre-optimisation deals disjoint identities to the ranks,
gives the files one process gives, and resumes by skipping what is stored; the hdb stage's DDP run equals one
process with the same global batch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIG = """
[stage]
stage = "hdb"
[hdb]
encoder_width = 16
encoder_layers = 1
encoder_heads = 2
patch_size = 4
image_size = 16
dim = 16
depth = 1
heads = 2
iterations = 2
supervision = "{supervision}"
[lidb]
a = 4
b = 2
steps = 6
batch = 2
[optim]
steps = 4
lr = 3e-3
warmup = 1
grad_clip = 0.0
accumulation = {accumulation}
[run]
out = "{out}"
batch = 4
checkpoint_every = 4
[data]
toy_pretrain = 30
"""


def _launch(tmp: Path, name: str, processes: int, *command: str, supervision: Path, accumulation: int = 1) -> str:
    config = tmp / f"{name}.toml"
    config.write_text(CONFIG.format(supervision=supervision.as_posix(), out=(tmp / name).as_posix(),
                                    accumulation=accumulation))
    args = ["-m", "hyperlora_core.train", command[0], "--config", str(config), *command[1:]]
    if processes > 1:
        args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, *args], cwd=tmp, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _computed(stdout: str) -> dict[int, list[str]]:
    """rank -> the identities it pre-optimised, from the command's report lines."""
    found = re.findall(r"rank (\d+): pre-optimised \d+ identities into \S+: ?(.*)", stdout)
    return {int(rank): labels.split() for rank, labels in found}


def _files(folder: Path) -> dict[str, dict]:
    return {p.name: load_file(str(p)) for p in sorted(folder.glob("*.lidb.safetensors"))}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("preopt1")
    out = _launch(tmp, "one", 1, "lidb-preopt", supervision=tmp / "lidb")
    return tmp / "lidb", out


def test_ranks_take_disjoint_identities_skip_stored_ones_and_match_one_process(single, tmp_path):
    """2 ranks on a folder already holding identities 0 and 1 (an interrupted run): the ranks share the other six,
    disjointly, and every file equals the one process's."""
    folder, stdout = single
    assert _computed(stdout) == {0: [str(i) for i in range(8)]}
    (tmp_path / "lidb").mkdir()
    for name in ("0.lidb.safetensors", "1.lidb.safetensors"):
        (tmp_path / "lidb" / name).write_bytes((folder / name).read_bytes())
    split = _computed(_launch(tmp_path, "two", 2, "lidb-preopt", supervision=tmp_path / "lidb"))
    sys.stdout.write(f"\nidentities computed per rank (0 and 1 were stored): {split}\n")
    assert set(split) == {0, 1} and split[0] and split[1] and not set(split[0]) & set(split[1])
    assert sorted(split[0] + split[1], key=int) == [str(i) for i in range(2, 8)]
    one, both = _files(folder), _files(tmp_path / "lidb")
    assert one.keys() == both.keys() and len(one) == 8
    worst = max(float((one[f][k] - both[f][k]).abs().max()) for f in one for k in one[f])
    sys.stdout.write(f"largest difference, 2 ranks vs 1 process: {worst:.1e}\n")
    assert worst == 0.0


@pytest.fixture(scope="module")
def one_process(single, tmp_path_factory):
    """The hdb stage on one process: global batch 4 in 2 accumulation micro-batches (each rank's share of 2)."""
    tmp = tmp_path_factory.mktemp("hdb1")
    _launch(tmp, "one", 1, "run", "--resume", "", supervision=single[0], accumulation=2)
    return tmp, load_file(str(tmp / "one" / "step_0000004" / "weights.safetensors"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_hdb_stage_two_processes_equal_one(single, one_process, tmp_path, mode):
    """DDP (or FSDP fully_shard) on 2 processes vs the same global batch in one process. Gradient clipping is off:
    FSDP sums the squared norm over its shards in another order, and with clipping on that one-ulp difference of the
    clip factor grew to 6e-6 after 4 AdamW steps (DDP: 0.0 either way)."""
    from hyperlora_core.train.config import load_config
    from hyperlora_core.train.stages import STAGES
    from hyperlora_core.train.toy import ToyDenoiser

    _launch(tmp_path, mode, 2, "run", "--resume", "", *(["--shard"] if mode == "fsdp" else []), supervision=single[0])
    one = one_process[1]
    two = load_file(str(tmp_path / mode / "step_0000004" / "weights.safetensors"))
    fresh = STAGES["hdb"].build(load_config(tmp_path / f"{mode}.toml"), ToyDenoiser()).state_dict()
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    moved = max(float((one[k] - fresh[k]).abs().max()) for k in one)
    sys.stdout.write(f"\nhdb stage, {mode} on 2 processes vs 1 process after 4 steps: {worst:.1e} (training moved "
                     f"the weights by up to {moved:.1e})\n")
    assert worst <= 1e-6 and moved > 1e-3
