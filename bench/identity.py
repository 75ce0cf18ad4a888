"""Benchmark of the identity pipeline, stage by stage, for 1 and 4 photos.

    python bench/identity.py [--dir /tmp/hyperlora_full] [--keep] [--threads 2]

Full-size random weights for the HyperLoRA checkpoint (as bench/core.py writes it) and for CLIP ViT-L/14
(QuickGELU, written as an open_clip-layout .safetensors). The face models are the test doubles in
the real antelopev2 ONNX formats (no real antelopev2 weights can be had here), so their absolute times are
small; the figure that matters is the ratio of the end-to-end time to the sum of the stages timed alone in the
same run: everything above 1.0 is overhead (decoding, crops, copies, repeated detection).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]


def median_time(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_clip(folder: Path) -> Path:
    """Random ViT-L/14 image-tower weights (fp16, std 0.02, unit norms) under open_clip's ``visual.*`` keys."""
    import torch
    from safetensors.torch import save_file

    from hyperlora_core.clip import ClipVisionConfig

    path = folder / "open_clip_vit_l14.safetensors"
    if not path.exists():
        gen = torch.Generator().manual_seed(0)
        shapes = ClipVisionConfig(width=1024, layers=24, heads=16, patch_size=14, image_size=224,
                                  mlp_dim=4096).open_clip_shapes()
        state = {}
        for key, shape in shapes.items():
            norm = ".ln_" in key or key.startswith("ln_")
            value = torch.ones(shape) if norm and key.endswith("weight") else torch.randn(shape, generator=gen) * 0.02
            state[f"visual.{key}"] = (torch.zeros(shape) if norm and key.endswith("bias") else value).half()
        save_file(state, str(path))
    return path


def photos(folder: Path, n: int) -> list[Path]:
    import numpy as np
    from PIL import Image

    from face_doubles import centred_box, paint_face

    paths = []
    for i in range(n):
        rng = np.random.default_rng(i)
        image = rng.integers(10, 40, size=(1280, 1280, 3), dtype=np.uint8)
        paint_face(image, centred_box(640 + 10 * i, 620, 320), seed=i)
        path = folder / f"photo{i}.jpg"
        Image.fromarray(image).save(path, quality=95)
        paths.append(path)
    return paths


def run(ckpt: Path, work: Path) -> None:
    from hyperlora_core import load_hyperlora
    from hyperlora_core.clip import ClipVisionEncoder
    from hyperlora_core.face import FaceAnalyzer

    from face_doubles import write_antelopev2

    hl = load_hyperlora(ckpt)
    clip = ClipVisionEncoder.from_folder(write_clip(work), device="cpu", dtype="fp32")
    faces = FaceAnalyzer(write_antelopev2(work / "antelopev2"), providers="cpu")
    print(f"face analysis provider: {faces.provider}; CLIP width {clip.width}; {hl!r}")
    mix_one = None
    for n in (1, 4):
        mix = measure(n, hl, clip, faces, work)
        if mix_one is None:
            mix_one = mix
        else:
            print(f"  mixing with 4 images / with 1 image: {mix / mix_one:.2f} (the basis is mixed "
                  "once for any number of photos)")


def measure(n, hl, clip, faces, work: Path) -> float:
    """Print the stage and end-to-end times for n photos; returns the mixing time."""
    import numpy as np
    import torch
    from insightface.app.common import Face as InsightFace

    from hyperlora_core.clip import preprocess
    from hyperlora_core.crops import arcface_crop, clip_crop
    from hyperlora_core.images import load_image
    from hyperlora_core.pipeline import CropOptions, IdentityPipeline

    paths = photos(work, n)
    images = [load_image(p) for p in paths]
    bgrs = [np.ascontiguousarray(im[:, :, ::-1]) for im in images]
    found = [faces._detector.detect(b, input_size=(640, 640), max_num=0) for b in bgrs]
    boxes = [(f[0][0], f[1][0]) for f in found]
    ins = [InsightFace(bbox=b[:4], kps=k, det_score=float(b[4])) for b, k in boxes]
    lms = [faces._landmark.get(b, f) for b, f in zip(bgrs, ins, strict=True)]
    crops = [clip_crop(im, lm, remove_background=True, grayscale=False) for im, lm in zip(images, lms,
                                                                                          strict=True)]
    pixels = preprocess(crops)
    tokens = clip.encode(pixels)
    arc = torch.nn.functional.normalize(torch.randn(n, 512), dim=-1)
    identity = hl.predict_identity(clip_tokens=tokens, id_embeds=arc)
    hl.identity_to_lora(identity)  # warm the mapped basis
    stages = {
        "detect": lambda: [faces._detector.detect(b, input_size=(640, 640), max_num=0) for b in bgrs],
        "landmarks": lambda: [faces._landmark.get(b, f) for b, f in zip(bgrs, ins, strict=True)],
        "arcface": lambda: [faces._recognition.get_feat(np.ascontiguousarray(arcface_crop(im, k)[:, :, ::-1]))
                            for im, (_, k) in zip(images, boxes, strict=True)],
        "clip": lambda: clip.encode(pixels),
        "resampler": lambda: hl.predict_identity(clip_tokens=tokens, id_embeds=arc),
        "mixing": lambda: hl.identity_to_lora(identity),
    }

    def end_to_end():
        pipeline = IdentityPipeline(hl, faces, clip)  # fresh: no cached face analysis
        ident, _ = pipeline.identity([load_image(p) for p in paths], CropOptions())
        hl.identity_to_lora(ident)

    # interleaved rounds: every stage, then the whole path, in each round; the ratio is taken per round, so
    # a slow spell on this shared machine hits both sides of it
    rounds = {name: [] for name in stages} | {"end to end": [], "ratio": []}
    for _ in range(5):
        for name, fn in stages.items():
            rounds[name].append(median_time(fn, repeat=1))
        rounds["end to end"].append(median_time(end_to_end, repeat=1))
        rounds["ratio"].append(rounds["end to end"][-1] / sum(rounds[name][-1] for name in stages))
    timed = {name: statistics.median(rounds[name]) for name in stages}
    parts = sum(timed.values())
    print(f"\n{n} image(s), medians of 5 interleaved rounds:")
    for name, t in timed.items():
        print(f"  {name:<10} {t * 1000:9.1f} ms   ({t / parts:5.1%} of the stages)")
    total = statistics.median(rounds["end to end"])
    ratios = sorted(rounds["ratio"])
    print(f"  end to end {total * 1000:9.1f} ms   ratio to the sum of stages {statistics.median(ratios):.2f} "
          f"(goal <= 1.3; per round {', '.join(f'{r:.2f}' for r in ratios)})")
    return timed["mixing"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "hyperlora_full")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    if not (args.dir / "hyper_lora_modules.json").exists():
        from core import write

        args.dir.mkdir(parents=True, exist_ok=True)
        write(args.dir)
    with tempfile.TemporaryDirectory() as work:
        run(args.dir, Path(work))


if __name__ == "__main__":
    main()
