"""LiDB: aux matrices against an independent NumPy reference of the documented recipe, the LoRA against the issue's
formulas, orthonormality, reproducibility, the file format's round trips and its refusals, and SDXL's file size."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from hyperlora_core.errors import (
    CheckpointFileMissing,
    LidbFormatError,
    LidbMismatchError,
    NotSafetensorsError,
    TruncatedFileError,
)
from hyperlora_core.identity import Identity
from hyperlora_core.lidb import (
    LIDB_A,
    LIDB_B,
    MAX_TARGETS_BYTES,
    LiDB,
    LidbAux,
    LidbLoRA,
    aux_pair,
    lora_key,
)
from hyperlora_core.targets import TargetLayers, TargetLinear, TargetModule, sdxl_target_layers
from hyperlora_core.topology import SDXL, UNetSpec

BLOCK = "diffusion_model.input_blocks.4.1.transformer_blocks.0"


def tiny_targets(family: str = "tiny", widths: tuple[int, int, int] = (16, 24, 32)) -> TargetLayers:
    """Two attention modules of real key names at tiny widths (self-attention 16 wide, cross-attention reading 24)."""
    d, ctx, d2 = widths
    attn1 = TargetModule(BLOCK + ".attn1", tuple(TargetLinear(f"{BLOCK}.attn1.{s}", d, d)
                                                 for s in ("to_q", "to_k", "to_v", "to_out.0")))
    attn2 = TargetModule(BLOCK + ".attn2", (TargetLinear(f"{BLOCK}.attn2.to_q", d, d),
                                            TargetLinear(f"{BLOCK}.attn2.to_k", ctx, d),
                                            TargetLinear(f"{BLOCK}.attn2.to_v", ctx, d),
                                            TargetLinear(f"{BLOCK}.attn2.to_out.0", d, d2)))
    return TargetLayers(family, (attn1, attn2))


# ---- an independent reference of the documented recipe (NumPy, Gram-Schmidt instead of Householder QR) ----

def ref_normals(seed: int, key: str, side: str, count: int) -> np.ndarray:
    label = b"hyperlora.lidb.aux.v1" + b"\0" + str(seed).encode() + b"\0" + key.encode() + b"\0" + side.encode()
    pairs = (count + 1) // 2
    words = np.frombuffer(hashlib.shake_256(label).digest(8 * pairs), dtype="<u4").astype(np.float64)
    u = (words + 0.5) / 2.0 ** 32
    out = []
    for u1, u2 in zip(u[0::2], u[1::2], strict=True):
        r = np.sqrt(-2.0 * np.log(u1))
        out += [r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)]
    return np.array(out[:count])


def gram_schmidt(m: np.ndarray) -> np.ndarray:
    q = np.zeros_like(m)
    for j in range(m.shape[1]):
        v = m[:, j].copy()
        for _ in range(2):  # twice is enough (Kahan)
            v -= q[:, :j] @ (q[:, :j].T @ v)
        q[:, j] = v / np.linalg.norm(v)
    return q


def ref_aux(linear: TargetLinear, seed: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
    m = ref_normals(seed, linear.key, "A", linear.in_features * a).reshape(linear.in_features, a)
    n = ref_normals(seed, linear.key, "B", linear.out_features * b).reshape(linear.out_features, b)
    return gram_schmidt(m).T, gram_schmidt(n)


def ref_delta(a_train: np.ndarray, b_train: np.ndarray, a_aux: np.ndarray, b_aux: np.ndarray) -> np.ndarray:
    """The issue's formulas: A = A_train · A_aux (1 × in), B = B_aux · B_train (out × 1), ΔW = B · A."""
    return (b_aux @ b_train.reshape(-1, 1)) @ (a_train.reshape(1, -1) @ a_aux)


CASES = [  # (seed, a, b)
    (0, 8, 4),
    (7, 16, 16),
    (2 ** 40 + 3, 1, 1),
]


@pytest.mark.parametrize("seed,a,b", CASES)
def test_aux_matrices_match_the_reference_and_are_orthonormal(seed, a, b):
    for linear in tiny_targets().linears:
        a_aux, b_aux = aux_pair(linear, seed, a, b)
        assert a_aux.dtype == b_aux.dtype == torch.float32
        assert a_aux.shape == (a, linear.in_features) and b_aux.shape == (linear.out_features, b)
        torch.testing.assert_close(a_aux @ a_aux.t(), torch.eye(a), atol=1e-5, rtol=0)  # row-orthonormal
        torch.testing.assert_close(b_aux.t() @ b_aux, torch.eye(b), atol=1e-5, rtol=0)  # column-orthonormal
        ra, rb = ref_aux(linear, seed, a, b)
        np.testing.assert_allclose(a_aux.numpy(), ra, atol=2e-6, rtol=0)
        np.testing.assert_allclose(b_aux.numpy(), rb, atol=2e-6, rtol=0)


def test_aux_depend_only_on_seed_and_key():
    targets = tiny_targets()
    forward = LidbAux(targets, seed=5, a=8, b=4)
    shuffled = TargetLayers("tiny", tuple(reversed(targets.modules)))
    backward = LidbAux(shuffled, seed=5, a=8, b=4)
    by_key = {lin.key: (backward.down_aux[j], backward.up_aux[j]) for j, lin in enumerate(shuffled.linears)}
    for j, lin in enumerate(targets.linears):
        down, up = by_key[lin.key]
        assert torch.equal(forward.down_aux[j], down) and torch.equal(forward.up_aux[j], up)
    again = LidbAux(targets, seed=5, a=8, b=4)
    assert all(torch.equal(x, y) for x, y in zip(forward.down_aux, again.down_aux, strict=True))
    other_seed = LidbAux(targets, seed=6, a=8, b=4)
    assert not torch.allclose(forward.down_aux[0], other_seed.down_aux[0], atol=1e-3)
    # two linears of the same shape get different matrices (q and k of attn1)
    assert not torch.allclose(forward.down_aux[0], forward.down_aux[1], atol=1e-3)


def test_aux_are_pinned_across_machines():
    """The file format rests on these numbers: a change to the recipe must come with a new format version."""
    a_aux, b_aux = aux_pair(TargetLinear("diffusion_model.x.to_q", 8, 6), 0, 2, 2)
    ra, rb = ref_aux(TargetLinear("diffusion_model.x.to_q", 8, 6), 0, 2, 2)
    got = [float(v) for v in (a_aux[0, 0], a_aux[1, 7], b_aux[0, 0], b_aux[5, 1])]
    assert got == pytest.approx([float(v) for v in (ra[0, 0], ra[1, 7], rb[0, 0], rb[5, 1])], abs=1e-6)
    assert got == pytest.approx(PINNED, abs=1e-6)


PINNED = [-0.1111347, -0.2334871, -0.5378692, -0.7521987]  # recipe v1, seed 0, key diffusion_model.x.to_q


def _weights(targets: TargetLayers, a: int = 8, b: int = 4, seed: int = 3) -> LiDB:
    g = torch.Generator().manual_seed(11)
    n = len(targets.linears)
    return LiDB(targets, torch.randn(n, a, generator=g), torch.randn(n, b, generator=g) * 0.1, seed=seed)


@pytest.mark.parametrize("key_format", ["comfy", "kohya"])
def test_lora_matches_the_formulas(key_format):
    targets = tiny_targets()
    w = _weights(targets)
    lora = w.lora(key_format=key_format)
    assert len(lora) == 3 * len(targets.linears)
    for j, lin in enumerate(targets.linears):
        prefix = lora_key(lin.key, key_format)
        down, up = lora[prefix + ".lora_down.weight"], lora[prefix + ".lora_up.weight"]
        assert down.shape == (1, lin.in_features) and up.shape == (lin.out_features, 1)
        delta = float(lora[prefix + ".alpha"]) / down.shape[0] * (up.double() @ down.double())
        ra, rb = ref_aux(lin, w.seed, w.a, w.b)
        want = ref_delta(w.a_train[j].double().numpy(), w.b_train[j].double().numpy(), ra, rb)
        np.testing.assert_allclose(delta.numpy(), want, atol=1e-5, rtol=1e-5)
    assert lora_key(targets.linears[7].key, "kohya") == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_out_0"


def test_wrong_implementations_are_caught():
    """The reference comparison fails for a LoRA made with the other seed, or with the aux sides swapped."""
    targets = tiny_targets()
    w = _weights(targets, a=4, b=4)
    lin = targets.linears[0]
    ra, rb = ref_aux(lin, w.seed, w.a, w.b)
    want = ref_delta(w.a_train[0].double().numpy(), w.b_train[0].double().numpy(), ra, rb)
    wrong_seed = LiDB(targets, w.a_train, w.b_train, seed=w.seed + 1).lora()
    swapped = LidbAux(targets, seed=w.seed, a=4, b=4)
    swapped.down_aux[0], swapped.up_aux[0] = swapped.up_aux[0].t().contiguous(), swapped.down_aux[0].t().contiguous()
    for lora in (wrong_seed, swapped.lora(w.a_train, w.b_train)):
        got = lora[lin.key + ".lora_up.weight"].double() @ lora[lin.key + ".lora_down.weight"].double()
        assert not np.allclose(got.numpy(), want, atol=1e-3)


@pytest.mark.parametrize("storage,atol", [("fp32", 0.0), ("fp16", 2e-3), ("int8", 2e-2)])
def test_file_round_trip(tmp_path, storage, atol):
    targets = tiny_targets()
    w = _weights(targets)
    w.meta["trained_on"] = "two photos"
    back = LiDB.load(w.save(tmp_path / "me.safetensors", storage=storage), targets=targets, a=8, b=4)
    assert back.targets == targets and back.seed == w.seed and back.meta == {"trained_on": "two photos"}
    torch.testing.assert_close(back.a_train, w.a_train, atol=atol, rtol=0)
    torch.testing.assert_close(back.b_train, w.b_train, atol=atol, rtol=0)


def test_sdxl_file_size(tmp_path):
    """SDXL's 560 linears at a = 100, b = 50: 84,000 numbers. fp16 is 168,000 bytes of data (above the 150 KB goal
    on arithmetic alone); int8 with a per-row scale stays under it."""
    targets = sdxl_target_layers(SDXL)
    n = len(targets.linears)
    w = LiDB(targets, torch.randn(n, LIDB_A) * 0.1, torch.randn(n, LIDB_B) * 0.01)
    assert n * (LIDB_A + LIDB_B) == 84_000
    sizes = {s: w.save(tmp_path / f"{s}.safetensors", storage=s).stat().st_size for s in ("fp16", "int8")}
    assert 168_000 < sizes["fp16"] < 168_000 + 8_000  # the data, plus a header of a few KB (description compressed)
    assert sizes["int8"] <= 150_000


def test_trainable_parametrisation():
    targets = tiny_targets()
    aux = LidbAux(targets, seed=1, a=8, b=4)
    model = LidbLoRA(aux, init_seed=0)
    assert sum(p.numel() for p in model.parameters()) == len(targets.linears) * (8 + 4)
    up, down = model.factors(0)
    assert torch.count_nonzero(up @ down) == 0  # starts at zero
    goal = _weights(targets, a=8, b=4, seed=1).lora()
    want = [goal[lin.key + ".lora_up.weight"] @ goal[lin.key + ".lora_down.weight"] for lin in targets.linears]
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for _ in range(200):
        loss = sum((torch.matmul(*model.factors(j)) - want[j]).pow(2).sum() for j in range(len(want)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 1e-3 * losses[0]
    saved = model.to_lidb({"mode": "test"})
    lora = saved.lora(aux)
    up, down = model.factors(1)
    key = targets.linears[1].key
    torch.testing.assert_close(lora[key + ".lora_up.weight"] @ lora[key + ".lora_down.weight"], (up @ down).detach())
    resumed = LidbLoRA(aux, start=saved)
    assert torch.equal(resumed.a_train, saved.a_train) and torch.equal(resumed.b_train, saved.b_train)
    with pytest.raises(LidbMismatchError, match="differs from the trained layout"):
        LidbLoRA(LidbAux(targets, seed=2, a=8, b=4), start=saved)


def test_sizes_that_cannot_be_orthonormal_are_refused():
    with pytest.raises(LidbMismatchError, match="a must be at most its in_features"):
        LidbAux(tiny_targets(), a=LIDB_A, b=LIDB_B)
    with pytest.raises(LidbMismatchError, match="at least 1"):
        aux_pair(TargetLinear("diffusion_model.x", 8, 8), 0, 0, 1)


def _rewrite(path, *, metadata=None, tensors=None):
    """Re-save a LiDB file with some metadata or tensors replaced (a damaged or foreign file)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = {**f.metadata(), **(metadata or {})}
        data = {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors or {})
    save_file(data, str(path), metadata=meta)
    return path


def _bomb() -> str:
    import base64
    import zlib

    return base64.b64encode(zlib.compress(b"[" + b" " * (MAX_TARGETS_BYTES + 10) + b"]", 9)).decode()


BAD_FILES = {  # name: (how to damage a saved file, what load is given, the error, its text)
    "missing": (lambda p: p.unlink(), {}, CheckpointFileMissing, "is missing"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-10]), {}, TruncatedFileError, "truncated"),
    "not_safetensors": (lambda p: p.write_bytes(b"\x80\x04pickle"), {}, NotSafetensorsError, "pickle"),
    "identity_file": (lambda p: Identity(torch.ones(8, 4) / 2, ("m",), "f").save(p), {}, LidbFormatError,
                      "not a LiDB file"),
    "newer_version": (lambda p: _rewrite(p, metadata={"version": "9"}), {}, LidbFormatError, "format version"),
    "bad_description": (lambda p: _rewrite(p, metadata={"targets": "!!"}), {}, LidbFormatError, "damaged metadata"),
    "description_bomb": (lambda p: _rewrite(p, metadata={"targets": _bomb()}), {}, LidbFormatError,
                         "inflates past"),
    "a_mismatch_in_file": (lambda p: _rewrite(p, metadata={"a": "6"}), {}, LidbFormatError,
                           r"tensor 'a_train' has shape \[8, 8\].*implies \[8, 6\]"),
    "extra_tensor": (lambda p: _rewrite(p, tensors={"lora_up": torch.ones(1)}), {}, LidbFormatError,
                     "does not have: lora_up"),
    "nan": (lambda p: _rewrite(p, tensors={"b_train": torch.full((8, 4), float("nan"), dtype=torch.float16)}), {},
            LidbFormatError, "NaN"),
    "wrong_a": (lambda p: None, {"a": 100}, LidbMismatchError, "has a=8, but 100 is expected"),
    "wrong_b": (lambda p: None, {"b": 50}, LidbMismatchError, "has b=4, but 50 is expected"),
    "other_model": (lambda p: None, {"targets": tiny_targets("other", (16, 24, 48))}, LidbMismatchError,
                    r"its linear 7 is .*attn2.to_out.0' 16->32, the model's is .* 16->48"),
    "fewer_linears": (lambda p: None, {"targets": TargetLayers("tiny", tiny_targets().modules[:1])},
                      LidbMismatchError, "describes 8 target linears"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_load_refuses(tmp_path, case):
    damage, kwargs, error, text = BAD_FILES[case]
    path = _weights(tiny_targets()).save(tmp_path / "me.safetensors")
    damage(path)
    with pytest.raises(error, match=text):
        LiDB.load(path, **kwargs)


def test_save_refuses_unknown_storage(tmp_path):
    with pytest.raises(ValueError, match="storage must be one of"):
        _weights(tiny_targets()).save(tmp_path / "x.safetensors", storage="int4")


def test_tiny_sdxl_topology_targets_work():
    spec = UNetSpec(name="tiny", level_widths=(16, 32), context_dim=24)
    targets = sdxl_target_layers(spec)
    w = _weights(targets, a=8, b=4)
    assert len(w.lora()) == 3 * 560


def test_lidb_on_a_frozen_base_trains_only_the_lidb_and_returns_what_it_trained():
    """Mode lidb's parametrisation: the base's factors stay as given, the LiDB's follow; the result LoRA is both
    (its delta is base + LiDB exactly) and the LiDB alone rebuilds its part."""
    from hyperlora_core.arithmetic import combine_by_rank
    from hyperlora_core.finetune import LidbOnBase

    targets = tiny_targets()
    base = combine_by_rank([(_weights(targets, seed=9).lora(), 0.85)])  # a frozen rank-1 "prediction", folded
    aux = LidbAux(targets, seed=1, a=8, b=4)
    param = LidbOnBase(aux, base, seed=0, meta={"trained_on": "test"})
    assert sum(p.numel() for p in param.parameters()) == len(targets.linears) * 12
    opt = torch.optim.Adam(param.parameters(), lr=1e-2)
    for _ in range(3):
        loss = sum((torch.matmul(*param.factors(j)) - 1).pow(2).mean() for j in range(len(targets.linears)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    result = param.result()
    assert result.identity is None and result.lidb.meta == {"trained_on": "test"}
    assert float(result.lidb.b_train.abs().max()) > 0
    lidb_lora = result.lidb.lora(aux)
    for j, lin in enumerate(targets.linears):
        with torch.no_grad():
            want = torch.matmul(*param.factors(j))
        got = result.lora[lin.key + ".lora_up.weight"] @ result.lora[lin.key + ".lora_down.weight"]
        torch.testing.assert_close(got, want)
        parts = (base[lin.key + ".lora_up.weight"] @ base[lin.key + ".lora_down.weight"]
                 + lidb_lora[lin.key + ".lora_up.weight"] @ lidb_lora[lin.key + ".lora_down.weight"])
        torch.testing.assert_close(got, parts, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(result.lora[lin.key + ".lora_down.weight"][:1], base[lin.key + ".lora_down.weight"])
    other = TargetLayers("tiny", tiny_targets().modules[:1])
    with pytest.raises(LidbMismatchError, match="adapt different layers"):
        LidbOnBase(LidbAux(other, seed=1, a=8, b=4), base)


def test_targets_from_weight_shapes_group_by_module_and_check_a_model():
    """The LiDB targets read off a MODEL's weights, and the one fit check (targets.check_fits) speaking of a LiDB."""
    from hyperlora_core.lidb import targets_from_shapes
    from hyperlora_core.targets import check_fits

    targets = tiny_targets()
    shapes = {lin.key: (lin.out_features, lin.in_features) for lin in targets.linears}
    assert targets_from_shapes("tiny", shapes) == targets  # to_out.0 belongs to its attention module
    weights = {key + ".weight": shape for key, shape in shapes.items()}
    as_lidb = dict(what="LiDB", error=LidbMismatchError)
    check_fits(targets, weights, "tiny", **as_lidb)
    with pytest.raises(LidbMismatchError, match=r"This LiDB was made for tiny and the MODEL is SD15: .*attn1\.to_q "
                                                r"does not exist in the MODEL; 1 of its 8 layers .* or a LiDB made for "
                                                r"SD15\."):
        check_fits(targets, dict(list(weights.items())[1:]), "SD15", **as_lidb)
    wrong = dict(weights)
    wrong[targets.linears[5].key + ".weight"] = (16, 32)
    with pytest.raises(LidbMismatchError, match=r"attn2\.to_k is \[16, 32\] in the MODEL, \[16, 24\] in the LiDB; "
                                                r"1 have other sizes\. .* or a LiDB trained on this one\."):
        check_fits(targets, wrong, "tiny", **as_lidb)
