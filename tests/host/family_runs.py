"""One /prompt run per family shared by the host tests: Apply of a HyperLoRA checkpoint on the family's tiny model
against the stock LoraLoaderModelOnly on the file Save HyperLoRA as LoRA wrote for that model."""

from __future__ import annotations

import safetensors
import torch
from comfy_server import show
from graphs import Graph, apply, identity

STRENGTH = 0.85
SEED = 3  # the tiny model's weights (the same in both prompts)


def read(path) -> tuple[dict[str, torch.Tensor], dict]:
    with safetensors.safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _model(g: Graph, family: str) -> list:
    return g.out(g.add("fam_model", "HLTestTinyFamily", family=family, seed=SEED))


def apply_vs_stock(server, family: str, checkpoint: str, tag: str) -> dict:
    """Run both prompts; return the dumped target weights (ours, stock, base), their metadata, the saved file's
    tensors and the server log written meanwhile."""
    log_start = len(server.server.log_text())
    g = Graph()
    model = _model(g, family)
    hl, ident = identity(g, checkpoint=checkpoint, image_seed=5)
    g.add("dump_ours", "HLTestDumpTargets", model=apply(g, model, hl, ident, strength=STRENGTH),
          name=f"{tag}_ours", feed_forward=False)
    g.add("dump_base", "HLTestDumpTargets", model=model, name=f"{tag}_base", feed_forward=False)
    g.add("save_lora", "SaveHyperLoRA", hyper_lora=hl, identity=ident, filename_prefix=f"hyperlora/{tag}",
          model=model)
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)
    saved = sorted((server.models / "loras").rglob(f"{tag}_*.safetensors"))
    assert len(saved) == 1, saved
    lora_name = saved[0].relative_to(server.models / "loras").as_posix()

    g = Graph()
    stock = g.add("stock", "LoraLoaderModelOnly", model=_model(g, family), lora_name=lora_name,
                  strength_model=STRENGTH)
    g.add("dump_stock", "HLTestDumpTargets", model=g.out(stock), name=f"{tag}_stock", feed_forward=False)
    run = server.server.run(g.prompt())
    assert run.status == "success", (run.error, run.response)

    out = {side: read(server.output / f"{tag}_{side}.safetensors") for side in ("ours", "stock", "base")}
    out["file"] = read(saved[0])[0]
    out["log"] = server.server.log_text()[log_start:]
    ours, stock, base = out["ours"][0], out["stock"][0], out["base"][0]
    out["worst"] = max(float((ours[k] - stock[k]).abs().max()) for k in ours)
    out["changed"] = sum(not torch.equal(ours[k], base[k]) for k in ours)
    show(f"\n{family} ({checkpoint}): ApplyHyperLoRA vs LoraLoader({lora_name}): max |diff| {out['worst']} over "
         f"{len(ours)} weights; {out['changed']} changed; file keys like {sorted(out['file'])[0]}")
    return out


def check(out: dict, family: str, n: int) -> None:
    """The applied weights equal the stock loader's on the saved file, every target patched and changed, every
    key of the file loaded."""
    (ours, ours_meta), (stock, stock_meta), (base, _) = out["ours"], out["stock"], out["base"]
    assert len(ours) == len(stock) == len(base) == n
    assert ours_meta["family"] == stock_meta["family"] == family
    assert ours_meta["patches"] == stock_meta["patches"] == str(n)
    assert len(out["file"]) == 3 * n  # down, up, alpha per target
    assert out["worst"] == 0.0
    assert out["changed"] == n
    assert "lora key not loaded" not in out["log"]


def hooks_vs_patching(denoiser, patcher, net, sample, lora: dict, latent_shape) -> dict:
    """One noisy latent predicted four ways: with the trainer's hooks carrying the network's ID-LoRA ("hooked"),
    plain ("plain"), with ComfyUI's stock patching of ``lora`` ("stock", returned with its ``patched`` clone), and
    plain again after unpatching ("again")."""
    import comfy.sd

    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(latent_shape, generator=g)
    t = torch.tensor([600])
    x_t = denoiser.noisy(x0, torch.randn(x0.shape, generator=g), t)
    context = denoiser.encode_text(["a photo of fcsks fxhks fhyks"])
    out = {}
    with torch.no_grad():
        out["hooked"] = denoiser.predict(x_t, t, context, net(sample.clip, sample.arcface, None)["id"])
        out["plain"] = denoiser.predict(x_t, t, context, None)
        patched, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0.0)
        patched.patch_model()
        try:
            out["stock"] = denoiser.predict(x_t, t, context, None)
        finally:
            patched.unpatch_model()
        out["again"] = denoiser.predict(x_t, t, context, None)
    out["patched"] = patched
    return out
