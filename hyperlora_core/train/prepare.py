"""``python -m hyperlora_core.train prepare``: a folder of portraits -> webdataset-style tar shards.

Face analysis runs once per image. An image is kept when it has exactly one face, that face's shorter box side
is at least ``--min-face`` pixels, and its yaw (estimated from the five keypoints: the nose's offset from the
eyes' midpoint over half the eye distance, as asin in degrees; approximate, 0 = frontal) is at most ``--max-yaw``.
Each kept image becomes one sample of a tar shard (members share the key, as webdataset reads them):

Sizes measured on skimage's astronaut (512² photo) with ``--resolution 512``; the photo at 1024 is about 4× its
512 size (JPEG bytes grow with the pixel count), an estimate:

================  =================================================  ===========  ======================
member            content                                            per sample   at 4.4 M samples
================  =================================================  ===========  ======================
``.jpg``          the photo, shorter side = resolution, JPEG q95     99 KB (512)  437 GB (~1.7 TB at 1024)
``.id.png``       the ID crop (background grey), short side 224, PNG 23 KB        101 GB
``.base.png``     the Base crop (face blurred), short side 224, PNG  70 KB        307 GB
``.arcface.npy``  the normed ArcFace embedding, float32 [512]        2.2 KB       9.6 GB
``.txt``          the caption; ``.cls`` the identity label if any   ~0.1 KB      ~0.4 GB
``.json``         face box, score, yaw                               ~0.1 KB      ~0.3 GB
================  =================================================  ===========  ======================

Crops are stored as images, not CLIP tokens: 257 × 1024 fp16 tokens are 526 KB per crop (2.3 TB per kind at
4.4 M); the frozen CLIP ViT-L/14 instead encodes the two crops of each sample in the training step. The crops are
the core's own (``crops.clip_crop`` with the background removed, ``crops.base_crop``), as inference makes them. VAE
latents at 1024² (4 × 128 × 128 fp16, 131 KB, 0.58 TB) are the alternative to the photo when the resolution is
fixed; this version stores the photo. Captions come from ``<image>.txt`` beside each image, or from one JSONL file of
``{"file": ..., "caption": ..., "identity": ...}`` rows. ``progress.jsonl`` in the output folder records every image
handled (kept with its shard, or the reason it was dropped), so an interrupted run continues where it stopped;
a shard is written to ``.tmp`` and renamed when complete. ``report.json`` counts the drops by reason.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}
CROP_SIDE = 224  # crops are stored at CLIP's input size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--images", required=True, help="folder of portraits (searched recursively)")
    parser.add_argument("--out", required=True, help="folder for the shards, progress.jsonl and report.json")
    parser.add_argument("--insightface", required=True, help="antelopev2 folder (face analysis)")
    parser.add_argument("--captions", default="", help="one JSONL file of {file, caption, identity} rows "
                        "(default: <image>.txt beside each image)")
    parser.add_argument("--per-shard", type=int, default=1000, help="samples per tar shard")
    parser.add_argument("--min-face", type=int, default=128, help="drop faces whose box is smaller (pixels)")
    parser.add_argument("--max-yaw", type=float, default=45.0, help="drop faces turned further (degrees)")
    parser.add_argument("--resolution", type=int, default=1024, help="shorter side of the stored photo")
    parser.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"), help="onnxruntime provider")


def estimate_yaw(kps: np.ndarray) -> float:
    """Approximate yaw in degrees from 5 keypoints (eyes, nose, mouth corners); 0 = frontal."""
    left, right, nose = kps[0], kps[1], kps[2]
    half = float(np.linalg.norm(right - left)) / 2
    if half <= 0:
        return 90.0
    offset = float(nose[0] - (left[0] + right[0]) / 2) / half
    return math.degrees(math.asin(max(-1.0, min(1.0, offset))))


def verdict(result, min_face: int, max_yaw: float) -> str:
    """"ok", or why the image is dropped."""
    if result.n_faces == 0 or result.face is None:
        return "no face"
    if result.n_faces > 1:
        return "more than one face"
    x1, y1, x2, y2 = result.face.bbox
    if min(x2 - x1, y2 - y1) < min_face:
        return f"face smaller than {min_face} px"
    if abs(estimate_yaw(result.face.kps)) > max_yaw:
        return f"yaw above {max_yaw:g} degrees"
    return "ok"


def _encode(array: np.ndarray, fmt: str, size: int | None = None, short_side: int | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(array)
    if size:
        im = im.resize((size, size), Image.BICUBIC)
    if short_side and min(im.size) != short_side:
        scale = short_side / min(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
    out = io.BytesIO()
    im.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return out.getvalue()


def sample_members(key: str, image: np.ndarray, face, caption: str, identity: str | None, resolution: int,
                   ) -> dict[str, bytes]:
    from ..crops import base_crop, clip_crop

    arc = io.BytesIO()
    np.save(arc, face.embedding.astype(np.float32), allow_pickle=False)
    members = {
        f"{key}.jpg": _encode(image, "JPEG", short_side=resolution),
        f"{key}.id.png": _encode(clip_crop(image, face.landmark_106, remove_background=True, grayscale=False),
                                 "PNG", short_side=CROP_SIDE),
        f"{key}.base.png": _encode(base_crop(image, face.landmark_106), "PNG", short_side=CROP_SIDE),
        f"{key}.arcface.npy": arc.getvalue(),
        f"{key}.txt": caption.encode(),
        f"{key}.json": json.dumps({"bbox": [round(float(v), 1) for v in face.bbox], "score": float(face.det_score),
                                   "yaw": round(estimate_yaw(face.kps), 1)}).encode(),
    }
    if identity is not None:
        members[f"{key}.cls"] = str(identity).encode()
    return members


def list_images(folder: Path, captions: str) -> list[tuple[Path, str, str | None]]:
    """(image, caption, identity) for every image; captions from the JSONL file or the .txt beside each image."""
    if not folder.is_dir():
        raise FileNotFoundError(f"--images '{folder}' is not a folder")
    if captions:
        rows = []
        for n, line in enumerate(Path(captions).read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                if "file" not in row:
                    raise ValueError(f"{captions}, line {n}: a row needs 'file' (and 'caption', optional 'identity')")
                rows.append((folder / row["file"], row.get("caption", ""), row.get("identity")))
        return rows
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip() if p.with_suffix(".txt").exists() else "",
             None) for p in images]


class ShardWriter:
    """Writes shard-<n>.tar via a .tmp file, renaming it when it holds ``per_shard`` samples (or at close)."""

    def __init__(self, out: Path, per_shard: int, first: int) -> None:
        self.out, self.per_shard, self.index, self.count, self.tar = out, per_shard, first, 0, None
        self.pending: list[str] = []  # progress lines of the samples in the open shard

    def add(self, members: dict[str, bytes], progress_line: str, progress) -> None:
        if self.tar is None:
            self.tar = tarfile.open(self.out / f"shard-{self.index:06d}.tar.tmp", "w")
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            self.tar.addfile(info, io.BytesIO(data))
        self.pending.append(progress_line)
        self.count += 1
        if self.count == self.per_shard:
            self.flush(progress)

    def flush(self, progress) -> None:
        if self.tar is None:
            return
        self.tar.close()
        tmp = self.out / f"shard-{self.index:06d}.tar.tmp"
        tmp.rename(tmp.with_suffix(""))
        for line in self.pending:
            progress.write(line.replace('"shard": null', f'"shard": {self.index}') + "\n")
        progress.flush()
        self.tar, self.pending, self.count = None, [], 0
        self.index += 1


def run_prepare(args: argparse.Namespace) -> int:
    from ..face import FaceAnalyzer
    from ..images import load_image

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done, reasons = {}, Counter()
    log_path = out / "progress.jsonl"
    if log_path.exists():
        for line in log_path.read_text().splitlines():
            row = json.loads(line)
            done[row["image"]] = row
            reasons[row["status"]] += 1
    for stale in out.glob("*.tar.tmp"):
        stale.unlink()
    items = [(p, c, i) for p, c, i in list_images(Path(args.images), args.captions) if str(p) not in done]
    faces = FaceAnalyzer(args.insightface, providers=args.provider)
    first = len(list(out.glob("shard-*.tar")))
    writer = ShardWriter(out, args.per_shard, first)
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    bar = tqdm(items, unit="img", desc="prepare") if tqdm else items
    with log_path.open("a") as progress:
        for n, (path, caption, identity) in enumerate(bar):
            try:
                image = load_image(path)
                result = faces.analyze(image, index=n)
                status = verdict(result, args.min_face, args.max_yaw)
            except (ValueError, OSError) as exc:
                status = f"unreadable image ({type(exc).__name__})"
            reasons[status if status == "ok" else status] += 1
            if status != "ok":
                progress.write(json.dumps({"image": str(path), "status": status}) + "\n")
                continue
            key = f"{writer.index:06d}_{writer.count:06d}"
            writer.add(sample_members(key, image, result.face, caption, identity, args.resolution),
                       json.dumps({"image": str(path), "status": "ok", "shard": None}), progress)
        writer.flush(progress)
    kept = reasons.pop("ok", 0)
    report = {"images": kept + sum(reasons.values()), "kept": kept, "dropped": dict(reasons.most_common()),
              "shards": writer.index}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    lines = [f"kept {kept} of {report['images']} images in {writer.index} shard(s) under {out}"]
    lines += [f"dropped {count}: {reason}" for reason, count in reasons.most_common()]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
