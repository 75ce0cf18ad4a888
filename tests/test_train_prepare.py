"""Dataset preparation: a folder of images -> tar shards, filtered by our face analysis, resumable, with a report.
Faces come from the ONNX doubles of tests/face_doubles.py (a bright textured square is a face)."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from hyperlora_core.train.cli import main
from hyperlora_core.train.prepare import estimate_yaw
from hyperlora_core.train.shards import ShardDataset

import face_fixtures
from face_doubles import centred_box, paint_face

antelope = face_fixtures.antelope  # the shared fixture

CASES = {  # name -> (faces as (cx, cy, side), expected verdict)
    "one_big": ([(320, 320, 150)], "ok"),
    "one_big_b": ([(300, 340, 140)], "ok"),
    "two_faces": ([(160, 320, 140), (480, 320, 140)], "more than one face"),
    "small_face": ([(320, 320, 44)], "face smaller than 100 px"),
    "dark": ([], "no face"),
}


def _write(folder, name, faces, seed):
    img = np.zeros((640, 640, 3), np.uint8)
    for k, (cx, cy, side) in enumerate(faces):
        paint_face(img, centred_box(cx, cy, side), seed=seed + k)
    Image.fromarray(img).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"a photo, {name}")


def _prepare(images, out, antelope):
    return main(["prepare", "--images", str(images), "--out", str(out), "--insightface", str(antelope),
                 "--per-shard", "1", "--min-face", "100", "--resolution", "256", "--provider", "cpu"])


def test_prepare_filters_reports_and_resumes(tmp_path, antelope, capsys):
    images, out = tmp_path / "images", tmp_path / "shards"
    images.mkdir()
    for n, (name, (faces, _)) in enumerate(CASES.items()):
        if name != "one_big_b":  # added later: the second run must only handle it
            _write(images, name, faces, seed=10 * n)
    assert _prepare(images, out, antelope) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["kept"] == 1 and report["images"] == 4
    assert report["dropped"] == {v: 1 for k, (_, v) in CASES.items() if v != "ok"}
    shards = sorted(out.glob("shard-*.tar"))
    assert [s.name for s in shards] == ["shard-000000.tar"]
    with tarfile.open(shards[0]) as tar:
        names = sorted(tar.getnames())
        assert [n.split(".", 1)[1] for n in names] == ["arcface.npy", "base.png", "id.png", "jpg", "json", "txt"]
        emb = np.load(io.BytesIO(tar.extractfile(next(n for n in names if n.endswith(".npy"))).read()),
                      allow_pickle=False)
        assert emb.shape == (512,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-4
        caption = tar.extractfile(next(n for n in names if n.endswith(".txt"))).read().decode()
        assert caption == "a photo, one_big"
    # resume: a second run handles only the new image and appends a shard
    _write(images, "one_big_b", CASES["one_big_b"][0], seed=99)
    first = (out / "progress.jsonl").read_text()
    assert _prepare(images, out, antelope) == 0
    rows = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    assert (out / "progress.jsonl").read_text().startswith(first) and len(rows) == 5
    assert json.loads((out / "report.json").read_text())["kept"] == 2
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert "dropped 1: more than one face" in capsys.readouterr().out


def test_each_rank_reads_disjoint_shards(tmp_path):
    out = tmp_path / "shards"
    out.mkdir()
    for n in range(5):
        with tarfile.open(out / f"shard-{n:06d}.tar", "w") as tar:
            data = f"caption {n}".encode()
            info = tarfile.TarInfo(f"{n:06d}_000000.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    seen = [set(ShardDataset(out, rank=r, world=2).keys) for r in (0, 1)]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 5
    assert ShardDataset(out, rank=0, world=2).read(0)["txt"] == b"caption 0"


@pytest.mark.parametrize("nose_x,sign", [(0.0, 0), (0.5, 1), (-0.5, -1)])
def test_yaw_estimate(nose_x, sign):
    kps = np.array([[-1, 0], [1, 0], [nose_x, 0.5], [-0.6, 1], [0.6, 1]], np.float32)
    yaw = estimate_yaw(kps)
    assert np.sign(round(yaw, 6)) == sign and abs(yaw) <= 30.0 + 1e-4


def test_identity_labels_of_every_sample(tmp_path):
    """ShardDataset.labels reads each sample's .cls (LiDB pre-optimisation groups images by it); "" without one."""
    out = tmp_path / "shards"
    out.mkdir()
    with tarfile.open(out / "shard-000000.tar", "w") as tar:
        for n, label in enumerate([b"alice", b"bob", None, b"alice"]):
            for suffix, data in (("txt", b"a caption"), ("cls", label)):
                if data is None:
                    continue
                info = tarfile.TarInfo(f"000000_{n:06d}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    assert ShardDataset(out).labels() == ["alice", "bob", "", "alice"]
