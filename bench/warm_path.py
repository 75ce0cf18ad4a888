"""The warm path (photo -> identity -> LoRA, networks loaded, pages cached) of this tree against another tree.

    python bench/warm_path.py --other /path/to/older/checkout [--pairs 4] [--repeat 3] [--threads 2] [--load-only]

Each side runs in a fresh process, alternating (this, other, this, other ...), on the same full-size random
checkpoint (``bench/core.py``'s writer), the same full-size random CLIP ViT-L/14 and the antelopev2 test doubles.
Inside a process the path runs once untimed, then ``--repeat`` times timed; the process reports the median wall
and CPU seconds (user + system of the whole process, which a busy shared machine inflates far less than wall
time). The ratio is taken pair by pair, so a slow spell hits both sides of a pair. ``--load-only`` times
``load_hyperlora`` alone instead (headers only; use ``--repeat 30``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(once, repeat: int) -> dict:
    once()
    walls, cpus = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        once()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus)}


def child(root: Path, ckpt: Path, work: Path, repeat: int, load_only: bool) -> dict:
    """Runs in the side's own process with ``root``'s packages first on sys.path."""
    sys.path[:0] = [str(root), str(root / "tests"), str(ROOT / "bench")]
    if load_only:
        from hyperlora_core import load_hyperlora

        return timed(lambda: load_hyperlora(ckpt), repeat)
    from identity import photos, write_clip

    from hyperlora_core import load_hyperlora
    from hyperlora_core.clip import ClipVisionEncoder
    from hyperlora_core.face import FaceAnalyzer
    from hyperlora_core.images import load_image
    from hyperlora_core.pipeline import CropOptions, IdentityPipeline

    from face_doubles import write_antelopev2

    hl = load_hyperlora(ckpt)
    clip = ClipVisionEncoder.from_folder(write_clip(work), device="cpu", dtype="fp32")
    faces = FaceAnalyzer(write_antelopev2(work / "antelopev2"), providers="cpu")
    paths = photos(work, 1)

    def once():
        pipeline = IdentityPipeline(hl, faces, clip)  # fresh: no cached face analysis
        identity, _ = pipeline.identity([load_image(p) for p in paths], CropOptions())
        hl.identity_to_lora(identity)

    return timed(once, repeat)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def run_side(root: Path, ckpt: Path, args) -> dict:
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, __file__, "--child", str(root), "--ckpt", str(ckpt), "--work", work,
               "--repeat", str(args.repeat), "--threads", str(args.threads)]
        cmd += ["--load-only"] if args.load_only else []
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other", type=Path, help="the checkout to compare with (e.g. a git worktree)")
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--load-only", action="store_true", help="time load_hyperlora alone")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "hyperlora_full")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no spinning threads counted as CPU time
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(child(args.child, args.ckpt, args.work, args.repeat, args.load_only)))
        return
    if args.other is None:
        parser.error("--other is required")
    if not (args.dir / "hyper_lora_modules.json").exists():
        sys.path.insert(0, str(ROOT / "bench"))
        from core import write

        args.dir.mkdir(parents=True, exist_ok=True)
        write(args.dir)
    rows = []
    for i in range(args.pairs):
        this = run_side(ROOT, args.dir, args)
        other = run_side(args.other.resolve(), args.dir, args)
        rows.append((this, other))
        print(f"pair {i + 1}: this wall {ms(this['wall'])} cpu {ms(this['cpu'])} | other wall "
              f"{ms(other['wall'])} cpu {ms(other['cpu'])} | ratio wall {this['wall'] / other['wall']:.3f} "
              f"cpu {this['cpu'] / other['cpu']:.3f}", flush=True)
    for key in ("wall", "cpu"):
        ratios = sorted(t[key] / o[key] for t, o in rows)
        print(f"{key}: this {ms(statistics.median(t[key] for t, _ in rows))}, other "
              f"{ms(statistics.median(o[key] for _, o in rows))}, ratio this/other median "
              f"{statistics.median(ratios):.3f} (min {ratios[0]:.3f}, max {ratios[-1]:.3f})")


if __name__ == "__main__":
    main()
