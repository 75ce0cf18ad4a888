"""LiDB's aux matrices made fast: bit for bit the torch formulation the LiDB files were made with (kept below as
it stood at 8b30336), whatever the threads, at SDXL's full widths; the in-process cache reuses a layout, stays
within its budget, never keeps a half-made layout, and hands out tensors that training can use."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
from test_lidb import tiny_targets

from hyperlora_core import lidb as lidb_module
from hyperlora_core import lidb_aux
from hyperlora_core.lidb import LiDB, LidbAux, LidbLoRA
from hyperlora_core.lidb_aux import AuxCache, aux_pair, iter_aux, layout_bytes
from hyperlora_core.targets import TargetLayers, TargetLinear, TargetModule, sdxl_target_layers

# ---- the formulation of recipe v1 as the LiDB files were made (8b30336), one linear at a time ----

def v1_normals(seed: int, key: str, side: str, count: int, two_pi: float = 2 * math.pi) -> torch.Tensor:
    pairs = (count + 1) // 2
    label = f"hyperlora.lidb.aux.v1\0{seed}\0{key}\0{side}".encode()
    raw = bytearray(hashlib.shake_256(label).digest(8 * pairs))
    words = torch.frombuffer(raw, dtype=torch.int32).to(torch.int64) & 0xFFFFFFFF
    u = (words.to(torch.float64) + 0.5) / 2.0 ** 32
    u1, u2 = u[0::2], u[1::2]
    r = torch.sqrt(-2.0 * torch.log(u1))
    z = torch.stack([r * torch.cos(two_pi * u2), r * torch.sin(two_pi * u2)], dim=1).reshape(-1)
    return z[:count]


def v1_orthonormal(m: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(m, mode="reduced")
    return q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0).to(q.dtype)


def v1_aux_pair(linear: TargetLinear, seed: int, a: int, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = v1_normals(seed, linear.key, "A", linear.in_features * a).reshape(linear.in_features, a)
    n = v1_normals(seed, linear.key, "B", linear.out_features * b).reshape(linear.out_features, b)
    return v1_orthonormal(m).t().contiguous().float(), v1_orthonormal(n).contiguous().float()


def sdxl_shapes() -> list[TargetLinear]:
    """One SDXL linear of each of its four shapes (640 and 1280 wide, the cross-attention's 2048 context), and a
    second 1280-wide one."""
    seen: dict[tuple[int, int], TargetLinear] = {}
    for lin in sdxl_target_layers().linears:
        seen.setdefault((lin.in_features, lin.out_features), lin)
    return [*seen.values(), sdxl_target_layers().linears[-1]]


def many_linears(n: int, width: int = 12) -> TargetLayers:
    return TargetLayers("many", (TargetModule("m", tuple(TargetLinear(f"m.l{j}", width, width) for j in range(n))),))


@pytest.mark.parametrize("seed,a,b", [(0, 100, 50), (2 ** 40 + 3, 7, 3)])
def test_threads_give_the_v1_bits_at_sdxl_widths(seed, a, b):
    """torch.equal, not a tolerance: the files store only a_train and b_train, so the matrices must not move."""
    linears = [*sdxl_shapes(), *(tiny_targets().linears[:2] if a <= 16 else ())]
    assert {(lin.in_features, lin.out_features) for lin in linears} >= {(640, 640), (1280, 1280), (2048, 640),
                                                                          (2048, 1280)}
    want = [v1_aux_pair(lin, seed, a, b) for lin in linears]
    for workers in (1, 3):
        got = list(iter_aux(linears, seed, a, b, workers=workers))
        assert len(got) == len(want)
        for lin, (d, u), (wd, wu) in zip(linears, got, want, strict=True):
            assert d.dtype == u.dtype == torch.float32
            assert torch.equal(d, wd) and torch.equal(u, wu), f"{lin.key} at {workers} worker(s)"


def test_the_bit_check_catches_a_near_miss():
    """Negative control: 2π rounded to float32 (a relative change of 3e-8 in the angle, as a careless rewrite might
    make) stays within the NumPy reference's tolerance, yet moves float32 elements, and torch.equal sees them."""
    lin = sdxl_shapes()[0]
    right = v1_aux_pair(lin, 0, 100, 50)[0]
    m = v1_normals(0, lin.key, "A", lin.in_features * 100, two_pi=float(torch.tensor(2 * math.pi)))
    wrong = v1_orthonormal(m.reshape(lin.in_features, 100)).t().contiguous().float()
    torch.testing.assert_close(wrong, right, atol=2e-6, rtol=0)
    assert not torch.equal(wrong, right)


def test_the_cache_reuses_a_layout_and_reports_it_once():
    cache, targets = AuxCache(budget=1 << 20), tiny_targets()
    calls: list[tuple[int, int]] = []
    down, up = cache.matrices(targets, 5, 8, 4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(j + 1, 8) for j in range(8)] and len(cache) == 1
    assert cache.nbytes == layout_bytes(targets, 8, 4) == sum(t.numel() * 4 for t in [*down, *up])
    calls.clear()
    again_down, again_up = cache.matrices(targets, 5, 8, 4, progress=lambda done, total: calls.append((done, total)))
    assert calls == [(8, 8)]
    assert all(x is y for x, y in zip([*down, *up], [*again_down, *again_up], strict=True))  # not made again
    down[0] = torch.zeros(1)  # a caller's list is its own
    assert cache.matrices(targets, 5, 8, 4)[0][0] is again_down[0]
    other = cache.matrices(targets, 6, 8, 4)[0]
    assert not torch.equal(other[0], again_down[0]) and len(cache) == 2


def test_the_cache_knows_a_layout_by_its_linears():
    """Refine from zero names its layout after the MODEL and groups it by module; a LiDB file keeps the name it was
    saved with: the same linears, seed, a and b are the same matrices."""
    cache, targets = AuxCache(), tiny_targets()
    renamed = TargetLayers("SDXL", (TargetModule("all", targets.linears),))
    assert renamed != targets
    first = cache.matrices(targets, 5, 8, 4)[0]
    assert cache.matrices(renamed, 5, 8, 4)[0][3] is first[3] and len(cache) == 1
    reordered = TargetLayers("tiny", tuple(reversed(targets.modules)))
    assert cache.matrices(reordered, 5, 8, 4)[0][0] is not first[4] and len(cache) == 2  # row j is linear j


def test_the_cache_stays_within_its_budget():
    targets = tiny_targets()
    one = layout_bytes(targets, 8, 4)
    cache = AuxCache(budget=2 * one)
    for seed in (1, 2, 3):
        cache.matrices(targets, seed, 8, 4)
        assert cache.nbytes <= 2 * one
    assert (targets, 1, 8, 4) not in cache and (targets, 3, 8, 4) in cache  # the least recently used went first
    cache.matrices(targets, 2, 8, 4)  # used: now the most recent
    cache.matrices(targets, 4, 8, 4)
    assert (targets, 2, 8, 4) in cache and (targets, 3, 8, 4) not in cache
    small = AuxCache(budget=one - 1)
    made = small.matrices(targets, 1, 8, 4)
    assert len(small) == 0 and not small.fits(targets, 8, 4) and len(made[0]) == 8  # too large: made, not kept


def test_an_interrupted_generation_keeps_nothing_and_stops_early(monkeypatch):
    made: list[str] = []

    def counting(linear, seed, a, b):
        made.append(linear.key)
        return aux_pair(linear, seed, a, b)

    monkeypatch.setattr(lidb_aux, "aux_pair", counting)
    targets, cache = many_linears(40), AuxCache()

    def interrupt(done: int, total: int) -> None:
        if done == 3:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        cache.matrices(targets, 0, 4, 2, progress=interrupt, workers=2)
    assert len(cache) == 0 and len(made) <= 3 + 2 * 2  # the consumer's three, at most two per worker ahead
    down, _ = cache.matrices(targets, 0, 4, 2, workers=2)
    assert len(down) == 40 and len(cache) == 1


@pytest.mark.parametrize("workers", [1, 2])
def test_matrices_made_under_inference_mode_can_train(workers):
    """ComfyUI runs nodes under torch.inference_mode(): Load LiDB fills the cache there, Refine trains on it after."""
    cache = AuxCache()
    with torch.inference_mode():
        down, up = cache.matrices(tiny_targets(), 9, 8, 4, workers=workers)
    vector = torch.ones(1, 8, requires_grad=True)
    (vector @ down[0]).square().sum().backward()
    assert vector.grad is not None and not down[0].is_inference() and not up[0].is_inference()


def test_lidb_lora_is_the_same_from_the_cache_and_streamed(monkeypatch):
    targets = tiny_targets()
    g = torch.Generator().manual_seed(4)
    weights = LiDB(targets, torch.randn(8, 8, generator=g), torch.randn(8, 4, generator=g), seed=31)
    cache = AuxCache()
    monkeypatch.setattr(lidb_module, "AUX_CACHE", cache)
    calls: list[tuple[int, int]] = []
    cached = weights.lora(progress=lambda done, total: calls.append((done, total)))
    assert (targets, 31, 8, 4) in cache and len(calls) == 8
    calls.clear()
    again = weights.lora(progress=lambda done, total: calls.append((done, total)))
    assert calls == [(8, 8)]  # a second load: nothing generated
    aux = LidbAux(targets, seed=31, a=8, b=4)
    assert aux.down_aux[0] is cache.matrices(targets, 31, 8, 4)[0][0]
    trained = LidbLoRA(aux)  # the trainer's own references: moving them leaves the cached tensors alone
    trained.place("meta")
    assert aux.down_aux[0].device.type == "cpu" and cache.matrices(targets, 31, 8, 4)[0][0].device.type == "cpu"
    monkeypatch.setattr(lidb_module, "AUX_CACHE", AuxCache(budget=0))  # too small: one linear at a time
    streamed = weights.lora(progress=lambda done, total: calls.append((done, total)))
    assert calls[1:] == [(j + 1, 8) for j in range(8)]
    for lora in (again, streamed):
        assert lora.keys() == cached.keys() and all(torch.equal(lora[k], cached[k]) for k in cached)
