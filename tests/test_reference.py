"""Independent reference for HyperLoRA's identity tokens and basis mixing.

Everything here is recomputed in float64 with plain loops straight from DESIGN.md section 1, reading the checkpoint
files with safetensors directly. Only the public API (load_hyperlora, synthetic.write_checkpoint) is imported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hyperlora_core import load_hyperlora
from hyperlora_core.synthetic import TINY_UNET, write_checkpoint

DIM_HEAD = 16  # passed to write_checkpoint; the real checkpoints use 64
TOL = 1e-5
NAMINGS = ("kohya_diffusers", "kohya_sgm", "diffusers")

# diffusers attention block -> SGM block (DESIGN.md section 1)
BLOCKS = {
    "down_blocks.1.attentions.0": "input_blocks.4.1",
    "down_blocks.1.attentions.1": "input_blocks.5.1",
    "down_blocks.2.attentions.0": "input_blocks.7.1",
    "down_blocks.2.attentions.1": "input_blocks.8.1",
    "mid_block.attentions.0": "middle_block.1",
    "up_blocks.0.attentions.0": "output_blocks.0.1",
    "up_blocks.0.attentions.1": "output_blocks.1.1",
    "up_blocks.0.attentions.2": "output_blocks.2.1",
    "up_blocks.1.attentions.0": "output_blocks.3.1",
    "up_blocks.1.attentions.1": "output_blocks.4.1",
    "up_blocks.1.attentions.2": "output_blocks.5.1",
}
PREFIXES = {k.replace(".", "_"): v for d, v in BLOCKS.items() for k in (d, v)}
# (basis key, kohya suffix, comfy suffix), in token order
LINEARS = (
    ("to_q", "to_q", "to_q"),
    ("to_k", "to_k", "to_k"),
    ("to_v", "to_v", "to_v"),
    ("to_out", "to_out_0", "to_out.0"),
)


def sgm_name(name: str) -> str:
    """Any of the three json namings -> dotted SGM name, e.g. input_blocks.4.1.transformer_blocks.0.attn1."""
    flat = name.removeprefix("lora_unet_").removesuffix(".processor").replace(".", "_")
    for prefix, sgm in PREFIXES.items():
        head = prefix + "_transformer_blocks_"
        if flat.startswith(head):
            t, attn = flat[len(head) :].split("_")
            assert t.isdigit() and attn in ("attn1", "attn2"), name
            return f"{sgm}.transformer_blocks.{t}.{attn}"
    raise KeyError(name)


# ---------------------------------------------------------------- float64 building blocks


def load64(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(path)).items()}


def linear(x: torch.Tensor, sd: dict, pre: str, bias: bool = True) -> torch.Tensor:
    w = sd[pre + ".weight"]
    out = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for o in range(w.shape[0]):
        out[:, o] = (x * w[o]).sum(-1) + (sd[pre + ".bias"][o] if bias else 0.0)
    return out


def layer_norm(x: torch.Tensor, sd: dict, pre: str, eps: float = 1e-5) -> torch.Tensor:
    mu = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mu) ** 2).sum(-1, keepdim=True) / x.shape[-1]
    return (x - mu) / torch.sqrt(var + eps) * sd[pre + ".weight"] + sd[pre + ".bias"]


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.special.erf(x / math.sqrt(2.0)))


def attention(sd: dict, pre: str, q_in: torch.Tensor, kv_in: torch.Tensor) -> torch.Tensor:
    q = linear(q_in, sd, pre + ".to_q", bias=False)
    k = linear(kv_in, sd, pre + ".to_k", bias=False)
    v = linear(kv_in, sd, pre + ".to_v", bias=False)
    heads = q.shape[1] // DIM_HEAD
    out = torch.zeros_like(q)
    for h in range(heads):
        cols = slice(h * DIM_HEAD, (h + 1) * DIM_HEAD)
        for i in range(q.shape[0]):
            logits = (k[:, cols] * q[i, cols]).sum(-1) / math.sqrt(DIM_HEAD)  # one score per key
            p = torch.exp(logits - logits.max())
            p = p / p.sum()
            out[i, cols] = (p[:, None] * v[:, cols]).sum(0)
    return linear(out, sd, pre + ".to_out.0", bias=False)


def resampler_image(rs: dict, conds: list[torch.Tensor]) -> torch.Tensor:
    """One image -> proj_out(latents) [Q, K], before batch averaging and normalisation.

    conds are the condition tokens in resampler order: [x (ArcFace tokens), y (CLIP)] for the ID resampler, entering
    through proj_in and proj_in_2 and cross-attended by attn2 and attn3. A one-condition resampler (the base one) has
    only proj_in and attn2.
    """
    feats = [linear(c, rs, proj) for c, proj in zip(conds, ("proj_in", "proj_in_2"), strict=False)]
    lat = rs["latents"][0].clone()
    depth = len({k.split(".")[1] for k in rs if k.startswith("layers.")})
    for n in range(depth):
        p = f"layers.{n}."
        a1 = layer_norm(lat, rs, p + "norm_attn1")
        lat = lat + attention(rs, p + "attn1", a1, a1)
        for j, cond in enumerate(feats):  # cross-attention to x (ArcFace), then to y (CLIP)
            attn, nl, nc = f"attn{j + 2}", f"norm_attn{j + 2}_l", f"norm_attn{j + 2}_{'xy'[j]}"
            lat = lat + attention(rs, p + attn, layer_norm(lat, rs, p + nl), layer_norm(cond, rs, p + nc))
        h = gelu(linear(layer_norm(lat, rs, p + "norm_ff"), rs, p + "ff.net.0.proj"))
        lat = lat + linear(h, rs, p + "ff.net.2")
    return linear(lat, rs, "proj_out")


def id_tokens(idp: dict, arc: torch.Tensor) -> torch.Tensor:
    """id_projector: Linear(E -> T*D), reshape to T x D, LayerNorm(D)."""
    d = idp["2.weight"].shape[0]
    return layer_norm(linear(arc[None], idp, "0").reshape(-1, d), idp, "2")


def l2norm(t: torch.Tensor) -> torch.Tensor:
    return t * (1.0 / torch.sqrt((t * t).sum(-1, keepdim=True) + 1e-8))


def combine(per: list[torch.Tensor], mode: str) -> torch.Tensor:
    if mode == "mean":
        return l2norm(sum(per) / len(per))
    if mode == "first":  # wrong: no batch average
        return l2norm(per[0])
    if mode == "norm_then_mean":  # wrong: normalise before averaging
        return sum(l2norm(t) for t in per) / len(per)
    raise ValueError(mode)


def reference_tokens(folder: Path, clip: torch.Tensor, arc: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    rs, idp = load64(folder / "resampler.safetensors"), load64(folder / "id_projector.safetensors")
    per = [resampler_image(rs, [id_tokens(idp, arc[b].double()), clip[b].double()]) for b in range(clip.shape[0])]
    return combine(per, mode)


def reference_base_tokens(folder: Path, base_clip: torch.Tensor) -> torch.Tensor:
    rs = load64(folder / "base_resampler.safetensors")
    return combine([resampler_image(rs, [base_clip[b].double()]) for b in range(base_clip.shape[0])], "mean")


def reference_lora(folder: Path, tokens: torch.Tensor, kind: str, key_format: str) -> dict[str, torch.Tensor]:
    names = list(json.loads((folder / "hyper_lora_modules.json").read_text()))
    bases = load64(folder / "hyper_lora_modules.safetensors")
    tokens = tokens.double()
    out = {}
    for i, name in enumerate(names):
        sgm = sgm_name(name)
        for j, (bkey, kohya_lin, comfy_lin) in enumerate(LINEARS):
            down_b, up_b = bases[f"{i}.{bkey}.{kind}_down_basis"], bases[f"{i}.{bkey}.{kind}_up_basis"]
            a, b = tokens[8 * i + 2 * j], tokens[8 * i + 2 * j + 1]
            down = torch.zeros_like(down_b[0])
            up = torch.zeros_like(up_b[0])
            for k in range(down_b.shape[0]):
                down += a[k] * down_b[k]
                up += b[k] * up_b[k]
            if key_format == "kohya":
                pre = f"lora_unet_{sgm.replace('.', '_')}_{kohya_lin}"
            else:
                pre = f"diffusion_model.{sgm}.{comfy_lin}"
            out[pre + ".lora_down.weight"] = down.T  # [r, in]
            out[pre + ".lora_up.weight"] = up.T  # [out, r]
            out[pre + ".alpha"] = torch.tensor(down_b.shape[2] * 0.5, dtype=torch.float64)
    return out


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    cache = {}

    def get(naming: str):
        if naming not in cache:
            path = tmp_path_factory.mktemp(naming) / "ckpt"
            folder = write_checkpoint(path, naming=naming, seed=0, base=True, dim_head=DIM_HEAD)
            cache[naming] = (Path(folder), load_hyperlora(folder, unet=TINY_UNET))
        return cache[naming]

    return get


def random_inputs(folder: Path, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rs = load_file(str(folder / "resampler.safetensors"))
    idp = load_file(str(folder / "id_projector.safetensors"))
    g = torch.Generator().manual_seed(seed)
    clip = torch.randn(batch, 257, rs["proj_in_2.weight"].shape[1], generator=g)
    arc = torch.randn(batch, idp["0.weight"].shape[1], generator=g)
    return clip, arc / arc.norm(dim=-1, keepdim=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert tuple(a.shape) == tuple(b.shape), (tuple(a.shape), tuple(b.shape))
    return float((a.double() - b.double()).abs().max())


def assert_lora_equal(ref: dict, got: dict) -> None:
    assert set(got) == set(ref), (sorted(set(ref) - set(got))[:5], sorted(set(got) - set(ref))[:5])
    worst = max((max_diff(ref[k], got[k].reshape(ref[k].shape) if k.endswith(".alpha") else got[k]), k) for k in ref)
    assert worst[0] <= TOL, worst


# ---------------------------------------------------------------- tests

TOKEN_CASES = [(naming, batch) for naming in NAMINGS for batch in (1, 3)]


@pytest.mark.parametrize(("naming", "batch"), TOKEN_CASES)
def test_tokens_match_reference(ckpts, naming, batch):
    folder, hl = ckpts(naming)
    clip, arc = random_inputs(folder, batch, seed=100 + batch)
    ident = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    names = tuple(json.loads((folder / "hyper_lora_modules.json").read_text()))
    assert tuple(ident.module_names) == names
    assert ident.tokens.dtype == torch.float32
    ref = reference_tokens(folder, clip, arc)
    assert ref.shape[0] == 8 * len(names)
    assert max_diff(ref, ident.tokens) <= TOL


@pytest.mark.parametrize("key_format", ["kohya", "comfy"])
@pytest.mark.parametrize("naming", NAMINGS)
def test_id_lora_matches_reference(ckpts, naming, key_format):
    folder, hl = ckpts(naming)
    clip, arc = random_inputs(folder, 2, seed=7)
    ident = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    got = hl.identity_to_lora(ident, kind="id", key_format=key_format)
    assert len(got) == 560 * 3
    ref = reference_lora(folder, ident.tokens, "id", key_format)
    assert len(ref) == 560 * 3
    assert_lora_equal(ref, got)
    r = load_file(str(folder / "hyper_lora_modules.safetensors"))["0.to_q.id_down_basis"].shape[2]
    assert {float(v) for k, v in got.items() if k.endswith(".alpha")} == {r * 0.5}


@pytest.mark.parametrize("naming", NAMINGS)
def test_base_lora_matches_reference(ckpts, naming):
    folder, hl = ckpts(naming)
    clip, arc = random_inputs(folder, 2, seed=11)
    assert hl.predict_identity(clip_tokens=clip, id_embeds=arc).base_tokens is None  # no blurred crops, no base
    # Base-LoRA input: CLIP tokens of the face-blurred crops (DESIGN.md training stage 1), width from the base file
    base_rs = load_file(str(folder / "base_resampler.safetensors"))
    g = torch.Generator().manual_seed(12)
    base_clip = torch.randn(2, 257, base_rs["proj_in.weight"].shape[1], generator=g)
    ident = hl.predict_identity(clip_tokens=clip, id_embeds=arc, base_clip_tokens=base_clip)
    assert ident.base_tokens is not None
    bases = load_file(str(folder / "hyper_lora_modules.safetensors"))
    r_id, r_base = bases["0.to_q.id_down_basis"].shape[2], bases["0.to_q.base_down_basis"].shape[2]
    assert r_base == r_id // 2
    # one-condition reading of the same Perceiver (DESIGN.md leaves the base resampler unspecified)
    assert max_diff(reference_base_tokens(folder, base_clip), ident.base_tokens) <= TOL
    got = hl.identity_to_lora(ident, kind="base", key_format="kohya")
    ref = reference_lora(folder, ident.base_tokens, "base", "kohya")
    assert len(got) == 560 * 3
    assert_lora_equal(ref, got)
    assert {float(v) for k, v in got.items() if k.endswith(".alpha")} == {r_base * 0.5}


def test_wrong_implementations_are_caught(ckpts):
    """The comparison can fail: plausible mistakes give differences far above the tolerance."""
    folder, hl = ckpts("kohya_sgm")
    clip, arc = random_inputs(folder, 3, seed=5)
    ident = hl.predict_identity(clip_tokens=clip, id_embeds=arc)
    good = reference_tokens(folder, clip, arc)
    assert max_diff(good, ident.tokens) <= TOL
    assert max_diff(reference_tokens(folder, clip, arc, mode="first"), ident.tokens) > 1e-3
    assert max_diff(reference_tokens(folder, clip, arc, mode="norm_then_mean"), ident.tokens) > 1e-3
    n, k = good.shape[0] // 8, good.shape[1]
    swapped = good.reshape(n, 4, 2, k).flip(2).reshape(-1, k)  # down <-> up tokens
    assert max_diff(swapped, ident.tokens) > 1e-3
    # basis mixing: swapping the down/up coefficients of the LoRA must be caught too
    got = hl.identity_to_lora(ident, kind="id", key_format="kohya")
    wrong = reference_lora(folder, swapped, "id", "kohya")
    with pytest.raises(AssertionError):
        assert_lora_equal(wrong, got)
