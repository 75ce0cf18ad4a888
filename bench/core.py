"""Benchmark of the core at full released size on the CPU: load, predict, mix, memory.

    python bench/core.py [--dir /tmp/hyperlora_full] [--keep] [--threads 2]

Writes a random checkpoint with the released shapes (140 modules, K=128, rank 8, resampler 1024/4/12, fp16,
about 3.1 GB) unless it is already there, then measures in a fresh child process so that the memory figures
belong to the loader alone. Every time is printed with a ratio to its reference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def proc_status() -> dict[str, int]:
    """RssAnon, RssFile and VmHWM (peak RSS) of this process, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def io_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def best_of(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def write(folder: Path) -> None:
    import torch

    from hyperlora_core.synthetic import write_checkpoint
    from hyperlora_core.topology import SDXL

    t0 = time.perf_counter()
    write_checkpoint(folder, unet=SDXL, k=128, rank=8, dim=1024, depth=4, heads=12, dim_head=64, num_id_tokens=16,
                     id_width=1024, clip_dim=1024, dtype=torch.float16, seed=0)
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"wrote full-size random checkpoint: {size / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")


def measure(folder: Path) -> None:
    import torch

    from hyperlora_core import load_hyperlora

    base = proc_status()
    read0 = io_read()
    t0 = time.perf_counter()
    hl = load_hyperlora(folder)
    t_ready = time.perf_counter() - t0
    after_load = proc_status()
    basis_bytes = hl.checkpoint.files["basis"].size
    print(f"load to ready      {t_ready * 1000:8.1f} ms   (official nodes, same machine class: 9.6 s warm -> "
          f"{9.6 / t_ready:.0f}x faster)")
    print(f"  read by syscalls {(io_read() - read0) / 2**20:8.2f} MiB  of {basis_bytes / 2**30:.2f} GiB basis "
          f"(ratio {(io_read() - read0) / basis_bytes:.5f}); RssFile +{gib(after_load['RssFile'] - base['RssFile'])}")

    g = torch.Generator().manual_seed(0)
    clip = torch.randn(1, 257, 1024, generator=g)
    arc = torch.nn.functional.normalize(torch.randn(1, 512, generator=g), dim=-1)
    t0 = time.perf_counter()
    identity = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    t_first = time.perf_counter() - t0
    t_pred = best_of(lambda: hl.predict_identity(clip_tokens=clip, id_embeds=arc))
    print(f"predict (1 image)  {t_pred * 1000:8.1f} ms   first call incl. building the resampler "
          f"{t_first * 1000:.1f} ms (ratio {t_first / t_pred:.2f})")

    t0 = time.perf_counter()
    lora = hl.identity_to_lora(identity)
    t_mix_first = time.perf_counter() - t0
    after = proc_status()
    del lora

    bank = hl.bank("id")
    file = hl.checkpoint.files["basis"]
    tensors = [file.tensor(m.key) for m in bank.members]
    tokens = identity.tokens

    def einsum_loop():
        for m in bank.members:
            basis = file.tensor(m.key)
            torch.einsum("k,kab->ab", tokens[m.token].to(basis.dtype), basis)

    # interleaved rounds, medians: the machine is shared and single timings wander by 2x
    runs = {"mix": lambda: bank.mix(tokens), "lora": lambda: hl.identity_to_lora(identity),
            "read": lambda: [t.sum() for t in tensors]}
    times = {name: [] for name in runs}
    for _ in range(7):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    t_mix, t_lora, t_read = (statistics.median(times[n]) for n in ("mix", "lora", "read"))
    t_loop = best_of(einsum_loop, repeat=1)
    print(f"mix 560 pairs      {t_mix * 1000:8.1f} ms   (median of 7; first call, which faults the mapped pages "
          f"in, from disk when the cache is cold: {t_mix_first * 1000:.1f} ms; with building the LoRA dict "
          f"{t_lora * 1000:.1f} ms, "
          f"ratio {t_lora / t_mix:.2f})")
    print(f"  vs per-module einsum loop {t_loop * 1000:8.1f} ms: {t_loop / t_mix:.1f}x faster (goal >= 3x)")
    print(f"  vs bare read of the basis {t_read * 1000:8.1f} ms: {t_mix / t_read:.2f}x the floor (goal <= 2x)")
    print(f"memory after predict+mix: RssAnon {gib(after['RssAnon'])} (+{gib(after['RssAnon'] - base['RssAnon'])} "
          f"over the bare interpreter, goal <= 1 GiB held), RssFile {gib(after['RssFile'])} (file-backed mmap), "
          f"peak RSS {gib(after['VmHWM'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "hyperlora_full")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint for the next run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--measure-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if args.measure_only:
        measure(args.dir)
        return
    if not (args.dir / "hyper_lora_modules.json").exists():
        args.dir.mkdir(parents=True, exist_ok=True)
        write(args.dir)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores")
    try:
        subprocess.run([sys.executable, __file__, "--dir", str(args.dir), "--threads", str(args.threads),
                        "--measure-only"], check=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
