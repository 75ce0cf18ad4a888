"""Tiny ONNX stand-ins for the five antelopev2 models, written at test time in insightface's real formats.

insightface routes models by their signatures, so these load through ``FaceAnalysis`` exactly like the real files:

- ``scrfd_10g_bnkps.onnx``: ``[1,3,?,?]`` -> 9 rank-2 outputs (scores x3, boxes x3, keypoints x3 for strides
  8/16/32, 2 anchors per cell). It "sees" a face wherever a bright square sits on a dark surround: for each anchor
  of window side F it scores ``2*(mean(inside) - mean(ring around it)) - 1`` on brightness in [0, 1], so a face is
  found when its side (in detector-input pixels) is within ``DETECTABLE`` of one of the windows
  ``FACE_WINDOWS``. The boxes and keypoints it returns are the window's own, centred on the anchor.
- ``2d106det.onnx``: ``[N,3,192,192] -> [N,212]``: a fixed 106-point face layout in the crop's [-1, 1] coordinates.
- ``glintr100.onnx``: ``[N,3,112,112] -> [N,512]``: a fixed random projection of the 4x4-pooled, mean-removed
  aligned crop, so the embedding depends on the face's pixels.
- ``genderage.onnx`` (``[N,3,96,96] -> [N,3]``) and ``1k3d68.onnx`` (``[N,3,192,192] -> [N,3309]``) complete the
  folder; the analyzer never runs them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

STRIDES = (8, 16, 32)
FACE_WINDOWS = {8: (40, 80), 16: (80, 160), 32: (160, 320)}  # stride -> window side of each of its 2 anchors (px)
DETECTABLE = (0.9, 1.25)  # a centred painted square of side P in [lo*F, hi*F] scores >= 0.5 for window F
GRID = 4  # brightness is averaged on a 4-px grid before the window sums
ANTELOPE_FILES = ("scrfd_10g_bnkps.onnx", "2d106det.onnx", "glintr100.onnx", "genderage.onnx", "1k3d68.onnx")

# 5 keypoints (eyes, nose, mouth corners) relative to a face window of side 1, centred on 0
KPS_TEMPLATE = np.array([[-0.18, -0.10], [0.18, -0.10], [0.0, 0.06], [-0.14, 0.22], [0.14, 0.22]], np.float32)


def landmark_template() -> np.ndarray:
    """106 plausible face points in the landmark model's output units ([-1, 1] over a crop 1.5x the face box)."""
    t = np.linspace(0.05 * np.pi, 0.95 * np.pi, 33)
    contour = np.stack([0.55 * np.cos(t), 0.62 * np.sin(t) - 0.02], 1)  # jaw line, below the eyes
    rng = np.random.default_rng(106)
    inner = rng.uniform([-0.38, -0.38], [0.38, 0.42], size=(106 - 33, 2))  # brows, eyes, nose, mouth
    return np.concatenate([contour, inner]).astype(np.float32)


def _graph_to_file(nodes, inputs, outputs, inits, path: Path, name: str) -> Path:
    import onnx
    from onnx import helper

    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="hyperlora-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _const(name: str, array) -> object:
    from onnx import numpy_helper

    return numpy_helper.from_array(np.asarray(array), name)


def write_detector(path: Path) -> Path:
    """The SCRFD double (see the module docstring)."""
    from onnx import TensorProto, helper

    nodes = [
        # input blob is (pixel - 127.5) / 128: brightness b = blob / 2 + 0.5, black 0, white ~1
        helper.make_node("ReduceMean", ["input.1"], ["grey"], axes=[1], keepdims=1, name="det_grey"),
        helper.make_node("Mul", ["grey", "half"], ["grey_h"], name="det_scale"),
        helper.make_node("Add", ["grey_h", "half"], ["bright"], name="det_shift"),
        helper.make_node("AveragePool", ["bright"], ["cells"], kernel_shape=[GRID, GRID], strides=[GRID, GRID],
                         name="det_cells"),
    ]
    inits = [_const("half", np.float32(0.5)), _const("two", np.float32(2.0)), _const("one", np.float32(1.0)),
             _const("three", np.float32(3.0)), _const("four", np.float32(4.0)), _const("zero", np.float32(0.0)),
             _const("flat1", np.array([-1, 1], np.int64)), _const("flat4", np.array([-1, 4], np.int64)),
             _const("flat10", np.array([-1, 10], np.int64))]
    outs = {"score": [], "bbox": [], "kps": []}
    for s in STRIDES:
        scores = []
        for a, f in enumerate(FACE_WINDOWS[s]):
            tag = f"s{s}a{a}"
            for kind, side in (("in", f), ("out", 2 * f)):
                k, pad = side // GRID, side // (2 * GRID)
                nodes.append(helper.make_node(
                    "AveragePool", ["cells"], [f"{tag}_{kind}"], kernel_shape=[k, k], strides=[s // GRID] * 2,
                    pads=[pad, pad, pad - s // GRID, pad - s // GRID], count_include_pad=1, name=f"det_{tag}_{kind}"))
            # ring mean = (4 * mean(2F window) - mean(F window)) / 3; score = 2 * (inside - ring) - 1
            nodes += [
                helper.make_node("Mul", [f"{tag}_out", "four"], [f"{tag}_o4"]),
                helper.make_node("Sub", [f"{tag}_o4", f"{tag}_in"], [f"{tag}_ring3"]),
                helper.make_node("Div", [f"{tag}_ring3", "three"], [f"{tag}_ring"]),
                helper.make_node("Sub", [f"{tag}_in", f"{tag}_ring"], [f"{tag}_c"]),
                helper.make_node("Mul", [f"{tag}_c", "two"], [f"{tag}_c2"]),
                helper.make_node("Sub", [f"{tag}_c2", "one"], [f"{tag}_c3"]),
                helper.make_node("Clip", [f"{tag}_c3", "zero", "one"], [f"{tag}_score"]),
            ]
            scores.append(f"{tag}_score")
        # [1,2,h,w] -> [1,h,w,2] -> [h*w*2, 1]: insightface orders candidates (y, x, anchor)
        nodes += [
            helper.make_node("Concat", scores, [f"s{s}_sc"], axis=1),
            helper.make_node("Transpose", [f"s{s}_sc"], [f"s{s}_hw2"], perm=[0, 2, 3, 1]),
            helper.make_node("Reshape", [f"s{s}_hw2", "flat1"], [f"score_{s}"]),
            helper.make_node("Mul", [f"s{s}_hw2", "zero"], [f"s{s}_z"]),
            helper.make_node("Add", [f"s{s}_z", "one"], [f"s{s}_ones"]),
            helper.make_node("Unsqueeze", [f"s{s}_ones", "axis4"], [f"s{s}_ones5"]),
        ]
        half_sides = np.array([f / (2 * s) for f in FACE_WINDOWS[s]], np.float32)  # in stride units
        inits += [_const(f"box_{s}", np.repeat(half_sides[:, None], 4, 1)),
                  _const(f"kp_{s}", np.stack([KPS_TEMPLATE.reshape(-1) * (f / s) for f in FACE_WINDOWS[s]]))]
        nodes += [
            helper.make_node("Mul", [f"s{s}_ones5", f"box_{s}"], [f"s{s}_box5"]),
            helper.make_node("Reshape", [f"s{s}_box5", "flat4"], [f"bbox_{s}"]),
            helper.make_node("Mul", [f"s{s}_ones5", f"kp_{s}"], [f"s{s}_kp5"]),
            helper.make_node("Reshape", [f"s{s}_kp5", "flat10"], [f"kps_{s}"]),
        ]
        for key, width in (("score", 1), ("bbox", 4), ("kps", 10)):
            outs[key].append(helper.make_tensor_value_info(f"{key}_{s}", TensorProto.FLOAT, [f"n{s}", width]))
    inits.append(_const("axis4", np.array([4], np.int64)))
    inp = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "?", "?"])
    return _graph_to_file(nodes, [inp], outs["score"] + outs["bbox"] + outs["kps"], inits, path, "scrfd_double")


def _constant_head(path: Path, size: int, values: np.ndarray, name: str) -> Path:
    """[N,3,size,size] -> [N,len(values)]: the same row for every input (a mean * 0 keeps the batch axis)."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("ReduceMean", ["data"], ["m"], axes=[1, 2, 3], keepdims=0, name=f"{name}_mean"),
        helper.make_node("Unsqueeze", ["m", "ax1"], ["m1"], name=f"{name}_unsq"),
        helper.make_node("MatMul", ["m1", "zeros"], ["z"], name=f"{name}_zero"),
        helper.make_node("Add", ["z", "row"], ["fc1"], name=f"{name}_row"),
    ]
    inits = [_const("ax1", np.array([1], np.int64)), _const("zeros", np.zeros((1, values.size), np.float32)),
             _const("row", values.reshape(1, -1).astype(np.float32))]
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, size, size])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", values.size])
    return _graph_to_file(nodes, [inp], [out], inits, path, name)


def write_landmark(path: Path) -> Path:
    return _constant_head(path, 192, landmark_template().reshape(-1), "lmk106")


def write_recognition(path: Path, seed: int = 512) -> Path:
    """[N,3,112,112] -> [N,512]: 4x4 average pool, flatten, remove each row's mean, fixed random projection."""
    from onnx import TensorProto, helper

    proj = np.random.default_rng(seed).standard_normal((3 * 28 * 28, 512)).astype(np.float32)
    nodes = [
        helper.make_node("AveragePool", ["data"], ["p"], kernel_shape=[4, 4], strides=[4, 4], name="rec_pool"),
        helper.make_node("Flatten", ["p"], ["f"], axis=1, name="rec_flat"),
        helper.make_node("ReduceMean", ["f"], ["mu"], axes=[1], keepdims=1, name="rec_mean"),
        helper.make_node("Sub", ["f", "mu"], ["fc"], name="rec_centre"),
        helper.make_node("MatMul", ["fc", "proj"], ["fc1"], name="rec_proj"),
    ]
    inp = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 112, 112])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", 512])
    return _graph_to_file(nodes, [inp], [out], [_const("proj", proj)], path, "glint_double")


def write_antelopev2(folder: Path, *, skip: tuple[str, ...] = ()) -> Path:
    """Write the five antelopev2 doubles into ``folder`` (created); ``skip`` leaves named files out."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    writers = {
        "scrfd_10g_bnkps.onnx": write_detector,
        "2d106det.onnx": write_landmark,
        "glintr100.onnx": write_recognition,
        "genderage.onnx": lambda p: _constant_head(p, 96, np.array([0.3, 0.7, 0.35], np.float32), "genderage"),
        "1k3d68.onnx": lambda p: _constant_head(p, 192, np.zeros(3309, np.float32), "lmk3d68"),
    }
    for name, write in writers.items():
        if name not in skip:
            write(folder / name)
    return folder


def paint_face(image: np.ndarray, box, *, seed: int = 0, low: int = 230) -> np.ndarray:
    """Paint a bright textured square "face" into ``image`` (in place, any channel layout) and return it.

    ``box`` is (x1, y1, x2, y2) in image pixels. The patch is an 8x8 grid of blocks with values uniform in
    [low, max] of the dtype's range (``seed`` picks the pattern, so two faces give two embeddings).
    """
    x1, y1, x2, y2 = (int(round(v)) for v in box)
    top = 1.0 if np.issubdtype(image.dtype, np.floating) else float(np.iinfo(image.dtype).max)
    region = image[y1:y2, x1:x2]
    rng = np.random.default_rng(seed)
    lo = low / 255.0 * top
    h, w = region.shape[:2]
    blocks = rng.uniform(lo, top, size=(8, 8))  # coarse pattern: survives pooling, so it reaches the embedding
    texture = blocks[np.arange(h) * 8 // max(h, 1)][:, np.arange(w) * 8 // max(w, 1)]
    texture = texture.reshape((h, w) + (1,) * (region.ndim - 2))
    region[...] = np.broadcast_to(texture, region.shape).astype(image.dtype)
    return image


def centred_box(cx: float, cy: float, side: float) -> tuple[float, float, float, float]:
    return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)


def astronaut_landmarks() -> np.ndarray:
    """Hand-placed, plausible 106 face points for ``skimage.data.astronaut()`` (512x512), in image pixels.

    Jaw from (174, 98) round the chin (219, 170) to (262, 98); brows near y 87; eyes at (198, 101) and (238, 101);
    nose down x 218; mouth centred on (219, 143). The order is not insightface's; crops only use the point set.
    """
    t = np.linspace(0.0, np.pi, 33)
    jaw = np.stack([218 + 44 * np.cos(t), 98 + 72 * np.sin(t)], 1)
    brow_t = np.linspace(0.0, 1.0, 9)
    brows = np.concatenate([np.stack([185 + 25 * brow_t, 90 - 4 * np.sin(np.pi * brow_t)], 1),
                            np.stack([228 + 25 * brow_t, 90 - 4 * np.sin(np.pi * brow_t)], 1)])
    e = np.linspace(0.0, 2 * np.pi, 10, endpoint=False)
    eyes = np.concatenate([np.stack([198 + 9 * np.cos(e), 101 + 3.5 * np.sin(e)], 1),
                           np.stack([238 + 9 * np.cos(e), 101 + 3.5 * np.sin(e)], 1)])
    nose = np.concatenate([np.stack([np.full(8, 218.0), np.linspace(102, 126, 8)], 1),
                           np.stack([208 + 20 * np.linspace(0, 1, 7), np.full(7, 129.0)], 1)])
    m = np.linspace(0.0, 2 * np.pi, 20, endpoint=False)
    mouth = np.stack([219 + 19 * np.cos(m), 143 + 7 * np.sin(m)], 1)
    pts = np.concatenate([jaw, brows, eyes, nose, mouth]).astype(np.float32)
    return pts


ASTRONAUT_KPS = np.array([[198, 101], [238, 101], [218, 124], [202, 143], [236, 143]], np.float32)
