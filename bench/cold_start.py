"""Cold start and memory: load -> one photo -> LoRA in fresh processes, disk-cold and with a warm page cache.

    python bench/cold_start.py --comfyui /path/to/ComfyUI [--dir /tmp/hyperlora_full] [--rounds 3] [--threads 2]

Each run is a fresh interpreter that imports ComfyUI (CPU mode) and this package, then goes through the nodes'
own code: Load HyperLoRA, HyperLoRA Face on one photo, HyperLoRA Identity to LoRA; then a second
photo and its LoRA (on a CPU-only machine the networks were freed after the first identity: this is what loading
them again costs). Before a "cold" run the checkpoint's and CLIP's pages are evicted from the page cache
(posix_fadvise(DONTNEED)); before a "warm" run they are read once. "keep" is a warm run with keep_networks on.
Runs alternate warm / cold / keep so that a slow spell of this shared machine hits all of them.

Weights: the released shapes with random values (bench/core.py writes the 3.1 GB checkpoint, bench/identity.py
the CLIP ViT-L/14), written once into --dir. The face models are the antelopev2 test doubles (no real antelopev2
can be had here): their own time is small. Memory: RssAnon (anonymous) and RssFile (file-backed pages mapped) of
the process from /proc/self/status, as the change from the bare process (torch + ComfyUI + this package imported).
Hold `flock /tmp/bigmem.lock` around a run: a child peaked at 5.3 GiB RSS here (the 3 GB basis mapped included).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from core import proc_status  # bench/core.py: RssAnon, RssFile, VmHWM of this process

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

STAGES = ("load", "photo", "lora", "photo2", "lora2")
LABELS = {"load": "Load HyperLoRA", "photo": "1st photo -> identity", "lora": "1st identity -> LoRA",
          "photo2": "2nd photo -> identity", "lora2": "2nd identity -> LoRA"}


def data_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.safetensors"))


def prepare(folder: Path) -> Path:
    """The checkpoint with a CLIP folder beside it, written unless present."""
    from core import write
    from identity import write_clip

    if not (folder / "hyper_lora_modules.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        write(folder)
    (folder / "clip_vit_large_14").mkdir(exist_ok=True)
    write_clip(folder / "clip_vit_large_14")
    return folder


def set_cache(folder: Path, mode: str) -> None:
    from hyperlora_core.readahead import evict

    for path in data_files(folder):
        if mode == "cold":
            evict(path)
        else:
            with open(path, "rb", buffering=0) as fh:
                buf = bytearray(16 << 20)
                while fh.readinto(buf):
                    pass


# -- the child: one fresh process, one sequence ---------------------------------------------------------------
def import_package(comfyui: Path):
    sys.path.insert(0, str(comfyui))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    import folder_paths  # noqa: F401

    spec = importlib.util.spec_from_file_location("hyperlora_pkg", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    package = importlib.util.module_from_spec(spec)
    sys.modules["hyperlora_pkg"] = package
    spec.loader.exec_module(package)
    from hyperlora_pkg.nodes import folders

    folders.register()


def photo(work: Path, seed: int):
    import torch
    from identity import photos

    from hyperlora_core.images import load_image

    path = photos(work, seed + 1)[seed]
    return torch.from_numpy(load_image(path)).float().unsqueeze(0) / 255.0


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import_package(args.comfyui)
    from hyperlora_pkg.nodes.apply import HyperLoRAToLoRA
    from hyperlora_pkg.nodes.handle import HyperLoRAHandle
    from hyperlora_pkg.nodes.identity import HyperLoRAFromImage

    from face_doubles import write_antelopev2

    work = Path(tempfile.mkdtemp(prefix="cold_start_"))
    faces = write_antelopev2(work / "antelopev2")
    images = [photo(work, 0), photo(work, 1)]
    base = proc_status()
    result: dict[str, dict] = {}
    handle = identity = None
    keep = {"keep_networks": True} if args.mode == "keep" else {}

    def stage(name: str, fn):
        t0 = time.perf_counter()
        value = fn()
        seconds = time.perf_counter() - t0
        now = proc_status()
        result[name] = {"s": seconds, "anon": now["RssAnon"] - base["RssAnon"],
                        "file": now["RssFile"] - base["RssFile"], "peak": now["VmHWM"]}
        return value

    def from_image(image):
        return HyperLoRAFromImage.execute(handle, image, True, False, -1, "error").args[0]

    handle = stage("load", lambda: HyperLoRAHandle(args.dir, faces, provider="cpu", dtype="fp32", **keep))
    if args.load_only:
        print(json.dumps({"mode": args.mode, "stages": result}))
        return
    identity = stage("photo", lambda: from_image(images[0]))
    stage("lora", lambda: HyperLoRAToLoRA.execute(handle, identity, "id").args[0])
    identity = stage("photo2", lambda: from_image(images[1]))
    stage("lora2", lambda: HyperLoRAToLoRA.execute(handle, identity, "id").args[0])
    loaded = handle.loaded() if hasattr(handle, "loaded") else {}
    print(json.dumps({"mode": args.mode, "stages": result, "loaded": loaded, "base_anon": base["RssAnon"]}))


# -- the parent: rounds of fresh processes, the table -----------------------------------------------------------
def run_child(args, mode: str) -> dict:
    set_cache(args.dir, "cold" if mode == "cold" else "warm")
    cmd = [sys.executable, __file__, "--child", mode, "--comfyui", str(args.comfyui), "--dir", str(args.dir),
           "--threads", str(args.threads)] + (["--load-only"] if args.load_only else [])
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:7.0f}"


def table(runs: dict[str, list[dict]]) -> None:
    def med(mode: str, name: str, key: str) -> float:
        return statistics.median(r["stages"][name][key] for r in runs[mode])

    print(f"\nmedians of {len(runs['warm'])} fresh processes per column; memory = change from the bare process "
          "(MiB)")
    print(f"{'stage':<24}{'warm s':>9}{'cold s':>9}{'cold/warm':>11}{'keep s':>9}{'warm/keep':>11}"
          f"{'anon':>9}{'file':>9}{'anon keep':>11}")
    for name in STAGES:
        w, c, k = (med(m, name, "s") for m in ("warm", "cold", "keep"))
        print(f"{LABELS[name]:<24}{w:9.2f}{c:9.2f}{c / w:11.2f}{k:9.2f}{w / k:11.2f}"
              f"{mib(med('warm', name, 'anon'))}  {mib(med('warm', name, 'file'))}  {mib(med('keep', name, 'anon'))}")

    def first(mode: str, r: dict) -> float:
        return sum(r["stages"][n]["s"] for n in ("load", "photo", "lora"))

    pairs = [first("cold", c) / first("warm", w) for c, w in zip(runs["cold"], runs["warm"], strict=True)]
    w = statistics.median(first("warm", r) for r in runs["warm"])
    c = statistics.median(first("cold", r) for r in runs["cold"])
    print(f"\nfirst LoRA (load + photo + LoRA): warm {w:.2f} s, disk-cold {c:.2f} s, ratio {c / w:.2f} "
          f"(goal <= 1.5; per round {', '.join(f'{p:.2f}' for p in sorted(pairs))})")
    print(f"loader: {med('cold', 'load', 's') * 1000:.1f} ms disk-cold, {med('warm', 'load', 's') * 1000:.1f} ms "
          f"warm (goal <= 100 ms; ratio {med('cold', 'load', 's') / 0.1:.2f} of the goal); RSS after it "
          f"+{med('cold', 'load', 'anon') / 2**20:.1f} MiB anon, +{med('cold', 'load', 'file') / 2**20:.1f} MiB "
          "file (goal <= 50 MiB)")
    held = med("warm", "photo", "anon")
    print(f"anonymous RSS held once the identity exists: {held / 2**30:.2f} GiB (goal <= 0.5 GiB, ratio "
          f"{held / 2**29:.2f}); with keep_networks {med('keep', 'photo', 'anon') / 2**30:.2f} GiB")
    again, kept = med("warm", "photo2", "s"), med("keep", "photo2", "s")
    print(f"2nd photo after the networks were freed: {again:.2f} s vs {kept:.2f} s kept: loading them again costs "
          f"{again - kept:.2f} s (ratio {again / kept:.2f})")
    peak = statistics.median(r["stages"]["lora2"]["peak"] for r in runs["warm"])
    print(f"peak RSS of a warm run {peak / 2**30:.2f} GiB; state at the end: {runs['warm'][-1]['loaded']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, default=os.environ.get("COMFYUI_PATH"),
                        help="a ComfyUI v0.3.64 tree (default: $COMFYUI_PATH)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "hyperlora_full")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--load-only", action="store_true",
                        help="only Load HyperLoRA, warm and disk-cold (reads headers: no lock needed)")
    parser.add_argument("--child", choices=("warm", "cold", "keep"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.comfyui is None or not (Path(args.comfyui) / "comfy").is_dir():
        parser.error("give --comfyui (or set COMFYUI_PATH) to a ComfyUI v0.3.64 tree")
    if args.child:
        args.mode = args.child
        child(args)
        return
    prepare(args.dir)
    import torch

    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} cores; checkpoint + CLIP "
          f"{sum(p.stat().st_size for p in data_files(args.dir)) / 2**30:.2f} GiB in {args.dir}")
    if args.load_only:
        loads = {m: [run_child(args, m)["stages"]["load"] for _ in range(args.rounds)] for m in ("warm", "cold")}
        for mode, rows in loads.items():
            t = statistics.median(r["s"] for r in rows)
            print(f"Load HyperLoRA {mode:<5} {t * 1000:7.1f} ms (goal <= 100 ms, ratio {t / 0.1:.2f}); RSS after it "
                  f"+{statistics.median(r['anon'] for r in rows) / 2**20:.1f} MiB anon, "
                  f"+{statistics.median(r['file'] for r in rows) / 2**20:.1f} MiB file (goal <= 50 MiB)")
        return
    runs: dict[str, list[dict]] = {"warm": [], "cold": [], "keep": []}
    for i in range(args.rounds):
        for mode in runs:
            runs[mode].append(run_child(args, mode))
            r = runs[mode][-1]["stages"]
            print(f"round {i + 1} {mode:<5}", "  ".join(f"{n} {r[n]['s']:.2f}s" for n in STAGES), flush=True)
    table(runs)


if __name__ == "__main__":
    main()
