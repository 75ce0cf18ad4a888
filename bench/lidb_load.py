"""Benchmark of what Load LiDB waits for at SDXL's size (560 linears, a = 100, b = 50), before and after a change.

    python bench/lidb_load.py --before /tmp/lidb-before [--threads 1 2] [--repeat 2]

``--before`` is a checkout of the code to compare with (``git worktree add /tmp/lidb-before 8b30336``). Each run is
a fresh Python process per tree and torch thread count (as ComfyUI is after a start), which does what Load LiDB does
three times: reads an fp16 LiDB file and rebuilds its LoRA (``LiDB.load(path).lora()``), then the same file again,
then another LiDB file of the same model. Prints, per row, the fastest of ``--repeat`` runs in wall-clock seconds
(what the user waits for; it depends on how many cores are free) and in the process's CPU seconds (all its
threads: the work done, which other programs' load does not change), with the ratio after / before beside each,
and whether the two trees' LoRAs are equal bit for bit (``torch.equal`` on every tensor).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("first load (nothing generated yet)", "the same file again", "another LiDB of the same model")


def worker(root: str, threads: int, files: list[str], out: str) -> None:
    """In a fresh process: the three loads with ``root``'s code; prints their (wall, CPU) seconds as JSON, saves the
    first LoRA."""
    sys.path.insert(0, root)
    import torch
    from safetensors.torch import save_file

    from hyperlora_core.lidb import LiDB

    torch.set_num_threads(threads)
    times, loras = [], []
    for path in (files[0], files[0], files[1]):
        start, cpu = time.perf_counter(), time.process_time()
        loras.append(LiDB.load(path).lora())
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    save_file(loras[0], out)
    print(json.dumps(times))


def make_files(folder: Path) -> list[str]:
    sys.path.insert(0, str(ROOT))
    import torch

    from hyperlora_core.lidb import LIDB_A, LIDB_B, LiDB
    from hyperlora_core.targets import sdxl_target_layers

    targets = sdxl_target_layers()
    n, g = len(targets.linears), torch.Generator().manual_seed(0)
    paths = []
    for name in ("anna", "ben"):
        weights = LiDB(targets, torch.randn(n, LIDB_A, generator=g) * 0.1, torch.randn(n, LIDB_B, generator=g) * 0.01)
        paths.append(str(weights.save(folder / f"{name}.safetensors", storage="fp16")))
    return paths


def run(root: Path, threads: int, files: list[str], out: Path) -> list[list[float]]:
    done = subprocess.run([sys.executable, __file__, "--worker", str(root), "--threads", str(threads), "--files",
                           *files, "--out", str(out)], check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_lora(a: Path, b: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch thread counts to run at")
    parser.add_argument("--repeat", type=int, default=2, help="fresh processes per tree and thread count")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--files", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.threads[0], args.files, args.out)
        return
    if args.before is None:
        parser.error("--before is needed: a checkout of the code to compare with")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = make_files(folder)
        print(f"SDXL LiDB (560 linears, a=100, b=50), fastest of {args.repeat} fresh processes per cell; "
              f"before = {args.before}, after = {ROOT}")
        for threads in args.threads:
            best: dict[str, list[list[float]]] = {}
            for _ in range(args.repeat):  # alternate the trees, so that a busy minute hits both
                for tree, root in (("before", args.before), ("after", ROOT)):
                    times = run(root, threads, files, folder / f"{tree}.safetensors")
                    best[tree] = [[min(t, b) for t, b in zip(now, old, strict=True)]
                                  for now, old in zip(times, best.get(tree, times), strict=True)]
            equal = same_lora(folder / "before.safetensors", folder / "after.safetensors")
            print(f"torch threads {threads} (LoRAs bit-identical: {equal})")
            for step, old, new in zip(STEPS, best["before"], best["after"], strict=True):
                print(f"  {step:<34} wall: before {old[0]:7.3f} s, after {new[0]:7.3f} s ({new[0] / old[0]:6.4f}x)"
                      f"   CPU: before {old[1]:7.3f} s, after {new[1]:7.3f} s ({new[1] / old[1]:6.4f}x)")


if __name__ == "__main__":
    main()
