"""Benchmark of LiDB at SDXL's size (560 attention linears, a = 100, b = 50), CPU, pure core.

    python bench/lidb.py [--threads 1]

Prints the file sizes per storage, and the seconds of: generating every aux matrix once (what Refine's mode lidb
does before training; the process's cache emptied first), the same once they are cached, rebuilding the LoRA from
a file's numbers (Load LiDB) with the cache empty and with it holding the layout, loading a file, and one training
step's LiDB factors (forward and backward of all 560 ``up``/``down`` projections, the part mode lidb adds to a
step); each time with its ratio to the first. ``bench/lidb_load.py`` compares Load LiDB with an older checkout.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hyperlora_core.finetune import LidbOnBase  # noqa: E402
from hyperlora_core.lidb import LIDB_A, LIDB_B, STORAGE, LiDB, LidbAux  # noqa: E402
from hyperlora_core.lidb_aux import AUX_CACHE, AUX_WORKERS  # noqa: E402
from hyperlora_core.targets import sdxl_target_layers  # noqa: E402


def timed(fn, repeat: int = 1) -> tuple[float, object]:
    start = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return (time.perf_counter() - start) / repeat, out


def step(param, n: int) -> None:
    """The factors of every linear and their backward (not the [out, in] deltas: those are the UNet's share)."""
    loss = sum(up.sum() + down.sum() for up, down in (param.factors(i) for i in range(n)))
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    targets = sdxl_target_layers()
    n = len(targets.linears)
    g = torch.Generator().manual_seed(0)
    weights = LiDB(targets, torch.randn(n, LIDB_A, generator=g) * 0.1, torch.randn(n, LIDB_B, generator=g) * 0.01)
    print(f"SDXL: {n} linears, a={LIDB_A}, b={LIDB_B}: {n * (LIDB_A + LIDB_B):,} numbers; {args.threads} torch "
          f"thread(s), {AUX_WORKERS} aux worker thread(s)")
    with tempfile.TemporaryDirectory() as tmp:
        paths = {s: weights.save(Path(tmp) / f"{s}.safetensors", storage=s) for s in STORAGE}
        for s, p in paths.items():
            print(f"  file {s:>4}: {p.stat().st_size:>9,} bytes")
        AUX_CACHE.clear()
        t_aux, aux = timed(lambda: LidbAux(targets))
        mib = sum(t.numel() * 4 for t in [*aux.down_aux, *aux.up_aux]) / 2 ** 20
        t_cached, _ = timed(lambda: LidbAux(targets), repeat=5)
        AUX_CACHE.clear()
        t_lora, _ = timed(weights.lora)
        t_lora_warm, _ = timed(weights.lora, repeat=5)
        t_load, _ = timed(lambda: LiDB.load(paths["fp16"], targets=targets), repeat=5)
    lidb = LidbOnBase(aux)
    step(lidb, n)  # warm-up
    t_step, _ = timed(lambda: step(lidb, n), repeat=3)
    rows = [(f"aux matrices, all {n} (float32, {mib:.0f} MiB)", t_aux),
            ("aux matrices again (cached)", t_cached),
            ("LoRA from a file's numbers (cache empty)", t_lora),
            ("LoRA from a file's numbers (cache holds them)", t_lora_warm),
            ("load + check an fp16 file", t_load),
            (f"mode lidb: {n} factors, forward + backward", t_step)]
    for name, t in rows:
        print(f"  {name:<50} {t:8.3f} s  ({t / t_aux:7.4f}x)")


if __name__ == "__main__":
    main()
