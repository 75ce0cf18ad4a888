"""Target layers as data: the extended module list round-trips, a released-style list means what it always meant,
a non-SDXL checkpoint mixes as DESIGN.md says (an independent float64 reference that reads the files itself), and a
model of another family is refused naming both families and the first layer that does not fit."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hyperlora_core import load_hyperlora
from hyperlora_core.errors import CheckpointFormatError, ModuleMismatchError
from hyperlora_core.lora_io import lora_delta
from hyperlora_core.synthetic import TINY_UNET, write_checkpoint
from hyperlora_core.targets import (
    TargetLayers,
    TargetLinear,
    TargetModule,
    check_fits,
    released_json,
    released_target_layers,
)
from hyperlora_core.topology import sdxl_modules

from helpers import conditions


def _module(name: str, *linears: tuple[str, int, int]) -> TargetModule:
    return TargetModule(name, tuple(TargetLinear(f"diffusion_model.{name}.{s}", i, o) for s, i, o in linears))


ATTN = (("to_q", 32, 32), ("to_k", 24, 32), ("to_v", 24, 32), ("to_out.0", 32, 32))
# SD1.5-like: UNet attention modules under SD1.5's names (input_blocks.1.1 has no attention in SDXL)
SD15 = TargetLayers("SD15", (_module("input_blocks.1.1.transformer_blocks.0.attn1", *((s, 32, 32) for s, _, _ in ATTN)),
                             _module("input_blocks.1.1.transformer_blocks.0.attn2", *ATTN),
                             _module("middle_block.1.transformer_blocks.0.attn2", *ATTN)))
# Flux-like: fused qkv of a double block, a single block whose linears mix attention and MLP, a one-linear module
FLUX = TargetLayers("Flux", (_module("double_blocks.0.img_attn", ("qkv", 16, 48), ("proj", 16, 16)),
                             _module("single_blocks.0", ("linear1", 16, 80), ("linear2", 48, 16)),
                             _module("final_layer", ("linear", 16, 8))))
# odd widths: no row width of 8 divides every basis, so mixing takes the staged path
ODD = TargetLayers("Odd", (_module("blocks.0.attn", ("qkv", 13, 39), ("proj", 13, 7)),))
CASES = {"sd15": (SD15, True), "flux": (FLUX, True), "odd": (ODD, False)}  # description, flat mixing path


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    cache = {}

    def make(name: str):
        if name not in cache:
            cache[name] = write_checkpoint(tmp_path_factory.mktemp(name), targets=CASES[name][0], k=8, rank=4,
                                           base=True)
        return cache[name]

    return make


@pytest.mark.parametrize("name", CASES)
def test_json_round_trip(name):
    layers = CASES[name][0]
    assert TargetLayers.from_json(json.loads(json.dumps(layers.to_json())), "x.json") == layers


def test_extended_json_names_family_and_sizes(written):
    raw = json.loads((written("flux") / "hyper_lora_modules.json").read_text())
    assert raw["__metadata__"] == {"family": "Flux"}
    assert raw["single_blocks.0"]["linears"][0] == {"key": "diffusion_model.single_blocks.0.linear1",
                                                    "in_features": 16, "out_features": 80}


@pytest.mark.parametrize("name", CASES)
def test_checkpoint_loads_its_description(written, name):
    layers, flat = CASES[name]
    hl = load_hyperlora(written(name))  # the default unet (SDXL) applies to released-style lists only
    assert hl.targets == layers and hl.checkpoint.family == layers.family
    assert hl.checkpoint.resampler.num_queries == 2 * len(layers.linears)
    assert (hl.bank("id").flat is not None) == flat


def reference_deltas(folder, tokens: torch.Tensor, kind: str = "id") -> dict[str, torch.Tensor]:
    """DESIGN.md's mixing in float64, from the files alone: linear l (json order) takes tokens 2l (down) and 2l+1
    (up); down = Σ_k a_k·down_basis[k] [in, r], up = Σ_k b_k·up_basis[k] [r, out]; the weight delta is
    alpha/r · upᵀ·downᵀ with alpha = r/2. Basis keys: <module index>.<linear's key under its module, to_out.0 as
    to_out, dots as underscores>.<kind>_<down|up>_basis."""
    raw = json.loads((folder / "hyper_lora_modules.json").read_text())
    basis = load_file(str(folder / "hyper_lora_modules.safetensors"))
    tokens = tokens.double()
    out, t = {}, 0
    for i, (name, entry) in enumerate((n, e) for n, e in raw.items() if n != "__metadata__"):
        for lin in entry["linears"]:
            rel = lin["key"][len(f"diffusion_model.{name}."):]
            rel = "to_out" if rel == "to_out.0" else rel.replace(".", "_")
            down_basis = basis[f"{i}.{rel}.{kind}_down_basis"].double()
            up_basis = basis[f"{i}.{rel}.{kind}_up_basis"].double()
            down = sum(tokens[t, k] * down_basis[k] for k in range(down_basis.shape[0]))
            up = sum(tokens[t + 1, k] * up_basis[k] for k in range(up_basis.shape[0]))
            rank = down.shape[1]
            out[lin["key"]] = (rank * 0.5 / rank) * (up.T @ down.T)
            t += 2
    assert t == tokens.shape[0]
    return out


@pytest.mark.parametrize("kind", ["id", "base"])
@pytest.mark.parametrize("name", CASES)
def test_mixing_equals_the_float64_reference(written, name, kind):
    folder = written(name)
    hl = load_hyperlora(folder)
    clip, arc = conditions(2, seed=3)
    identity = hl.predict_identity(clip_tokens=clip, id_embeds=arc, base_clip_tokens=clip)
    tokens = identity.tokens if kind == "id" else identity.base_tokens
    assert tokens.shape[0] == CASES[name][0].token_count
    lora = hl.identity_to_lora(identity, kind=kind, key_format="comfy")
    want = reference_deltas(folder, tokens, kind)
    assert list(want) == [lin.key for lin in CASES[name][0].linears]
    for key, ref in want.items():
        got = lora_delta(lora, key).double()
        assert got.shape == ref.shape and ref.abs().max() > 1e-3
        assert float((got - ref).abs().max()) <= 1e-5 * float(ref.abs().max()), key


def test_kohya_keys_of_another_family(written):
    hl = load_hyperlora(written("flux"))
    clip, arc = conditions(1)
    lora = hl.identity_to_lora(hl.predict_identity(clip_tokens=clip, id_embeds=arc))
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in lora
    assert lora["lora_unet_single_blocks_0_linear1.lora_up.weight"].shape == (80, 4)


def test_released_list_means_what_it_meant(tiny_ckpt):
    """A released-style json (names, hidden_size, cross_attention_dim) is SDXL's 4 linears per module, in json
    order, at the listed widths; written back in the released form it is the same file content."""
    hl = load_hyperlora(tiny_ckpt, unet=None)
    assert hl.targets == released_target_layers(sdxl_modules(), TINY_UNET)
    assert hl.checkpoint.family == "SDXL" and len(hl.targets.linears) == 560
    first = hl.targets.linears[1]
    assert first.key == "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k"
    cross_k = hl.targets.linears[5]
    assert cross_k.key.endswith("attn2.to_k") and (cross_k.in_features, cross_k.out_features) == (24, 16)
    assert released_json(hl.targets) == json.loads((tiny_ckpt / "hyper_lora_modules.json").read_text())
    assert released_json(SD15) is None and released_json(FLUX) is None


BAD = {
    "no family": ({"m": {"linears": [{"key": "diffusion_model.m.a", "in_features": 2, "out_features": 2}]}},
                  "__metadata__"),
    "extra field": ({"__metadata__": {"family": "X"}, "m": {"linears": [
        {"key": "diffusion_model.m.a", "in_features": 2, "out_features": 2, "bias": True}]}}, "linear 0 of 'm'"),
    "size not an int": ({"__metadata__": {"family": "X"}, "m": {"linears": [
        {"key": "diffusion_model.m.a", "in_features": "2", "out_features": 2}]}}, "two integers"),
    "zero size": ({"__metadata__": {"family": "X"}, "m": {"linears": [
        {"key": "diffusion_model.m.a", "in_features": 0, "out_features": 2}]}}, "positive"),
    "no linears": ({"__metadata__": {"family": "X"}, "m": {"linears": []}}, "at least one linear"),
    "twice": ({"__metadata__": {"family": "X"}, **{m: {"linears": [
        {"key": "diffusion_model.m.a", "in_features": 2, "out_features": 2}]} for m in ("m", "n")}}, "listed twice"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_extended_list_is_refused(tmp_path, written, case):
    raw, words = BAD[case]
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for file in written("odd").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "hyper_lora_modules.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointFormatError, match="hyper_lora_modules.json") as err:
        load_hyperlora(folder)
    assert words in str(err.value)


def _shapes(layers: TargetLayers) -> dict[str, tuple[int, int]]:
    return {lin.key + ".weight": lin.weight_shape for lin in layers.linears}


def test_a_model_of_the_same_layout_fits():
    check_fits(SD15, {**_shapes(SD15), "diffusion_model.out.weight": (4, 4)}, "SD15")


def test_a_model_of_another_family_is_refused():
    with pytest.raises(ModuleMismatchError) as err:
        check_fits(SD15, _shapes(FLUX), "Flux")
    text = str(err.value)
    assert "made for SD15 and the MODEL is Flux" in text
    assert "First layer that does not fit: diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q " \
           "does not exist" in text
    assert "12 of its 12 layers do not exist" in text and "Use a model of the SD15 family" in text


def test_other_sizes_name_the_first_layer_that_differs():
    shapes = _shapes(SD15)
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    shapes[key] = (32, 48)  # a 48-wide text context
    shapes.pop("diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight")
    with pytest.raises(ModuleMismatchError) as err:
        check_fits(SD15, shapes, "SD15")
    text = str(err.value)
    assert f"{key[:-len('.weight')]} is [32, 48] in the MODEL, [32, 24] in the HyperLoRA" in text
    assert "1 of its 12 layers do not exist in the MODEL and 1 have other sizes" in text
    assert "other widths" in text


def test_training_export_of_another_family(tmp_path):
    """A hypernetwork for the Flux-like description exports the extended list; loaded back, its LoRAs equal the
    trainer's in-graph factors (fp32). The toy's SDXL-named description still exports the released form."""
    from hyperlora_core.train.config import TrainConfig
    from hyperlora_core.train.export import export_checkpoint
    from hyperlora_core.train.hypernet import HyperNetwork
    from hyperlora_core.train.toy import ToyDenoiser

    model = dict(k=8, id_rank=4, dim=32, depth=1, heads=2, dim_head=16, id_tokens=4, clip_dim=32, up_basis_std=0.05)
    net = HyperNetwork(TrainConfig().replace(model=model).model, FLUX).eval()
    folder = export_checkpoint(net, tmp_path / "flux", dtype=torch.float32)
    raw = json.loads((folder / "hyper_lora_modules.json").read_text())
    assert TargetLayers.from_json(raw, "export") == FLUX
    hl = load_hyperlora(folder)
    clip = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(0))
    arc = torch.nn.functional.normalize(torch.randn(1, 512, generator=torch.Generator().manual_seed(1)), dim=-1)
    with torch.no_grad():
        graph = net(clip, arc, None)["id"]
    lora = hl.identity_to_lora(hl.predict_identity(clip_tokens=clip, id_embeds=arc), key_format="comfy")
    assert list(graph) == [lin.key for lin in FLUX.linears]
    for key, (down, up) in graph.items():
        delta = lora_delta(lora, key)
        assert float((delta - up[0] @ down[0]).abs().max()) <= 1e-5 * float(delta.abs().max()), key
    toy = export_checkpoint(HyperNetwork(TrainConfig().replace(model=model).model, ToyDenoiser().targets),
                            tmp_path / "toy")
    assert "__metadata__" not in json.loads((toy / "hyper_lora_modules.json").read_text())


@pytest.mark.parametrize("order", ["sgm", "diffusers"])
def test_released_load_path_has_the_generic_basis_layout(tiny_factory, order):
    """The released list's fast load path lays the basis out exactly as the generic rule does for its description."""
    from hyperlora_core.targets import basis_layout, released_basis_layout
    from hyperlora_core.topology import diffusers_order

    modules = sdxl_modules() if order == "sgm" else diffusers_order()
    assert released_basis_layout(modules, TINY_UNET) == basis_layout(released_target_layers(modules, TINY_UNET))
    hl = load_hyperlora(tiny_factory(order=order), unet=TINY_UNET)
    assert hl.checkpoint.listed.targets is None and hl.checkpoint.family == "SDXL"  # not built at load
    assert hl.targets == released_target_layers(modules, TINY_UNET)
