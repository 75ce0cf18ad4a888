"""One self-describing file for a trained HyperDreamBooth hypernetwork (what *Load HyperDreamBooth* reads).

A safetensors file: every weight of the network (fp16 by default) and metadata ``format``, ``version``, ``hdb``
(the network's sizes as JSON, the encoder described by its sizes so no CLIP file is needed to load it), ``lidb``
(``{"a", "b", "seed"}``: the LiDB layout the heads predict) and ``targets`` (the target linears, as LiDB files store
them). Loading checks every key and shape before use.
"""

from __future__ import annotations

import json
from dataclasses import asdict, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import HyperLoRAError
from ..lidb import LiDB, targets_from_dict, targets_to_dict
from ..safetensors_file import read_header, save_atomic
from .config import HdbConfig
from .network import HyperDreamBooth

FORMAT = "hyperlora.hdb"
FORMAT_VERSION = "1"
TRAINING_ONLY = ("supervision", "weight_loss", "denoise_loss", "iterate_decay", "encoder", "freeze_encoder")


class HdbFormatError(HyperLoRAError, ValueError):
    """A file is not a usable HyperDreamBooth checkpoint."""


def _portable(net: HyperDreamBooth) -> HdbConfig:
    """The config with the encoder described by its sizes (the file's own weights replace any CLIP file)."""
    from open_clip.transformer import QuickGELU

    visual = net.encoder
    width = visual.conv1.weight.shape[0]
    block = visual.transformer.resblocks[0]
    return replace(net.config, encoder="", supervision="", encoder_width=width,
                   encoder_layers=len(visual.transformer.resblocks), encoder_heads=block.attn.num_heads,
                   patch_size=visual.conv1.weight.shape[-1], image_size=net.image_size,
                   encoder_mlp_ratio=block.mlp.c_fc.weight.shape[0] / width,
                   encoder_quick_gelu=isinstance(block.mlp.gelu, QuickGELU), encoder_eps=float(visual.ln_pre.eps))


def save_hdb(net: HyperDreamBooth, path: str | Path, *, seed: int, dtype: torch.dtype = torch.float16) -> Path:
    """Write ``net`` (LiDB aux ``seed``) as one checkpoint file, atomically."""
    config = {k: v for k, v in asdict(_portable(net)).items() if k not in TRAINING_ONLY}
    metadata = {"format": FORMAT, "version": FORMAT_VERSION, "hdb": json.dumps(config),
                "lidb": json.dumps({"a": net.a, "b": net.c, "seed": int(seed)}),
                "targets": json.dumps(targets_to_dict(net.targets))}
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in net.state_dict().items()}
    return save_atomic(tensors, path, metadata=metadata)


def load_hdb(path: str | Path, *, device: torch.device | str = "cpu") -> tuple[HyperDreamBooth, int]:
    """(the network in eval mode, fp32, on ``device``; its LiDB aux seed) from a file written by :func:`save_hdb`."""
    path = Path(path)
    _, infos, metadata, _ = read_header(path, "HyperDreamBooth")
    if metadata.get("format") != FORMAT:
        raise HdbFormatError(f"HyperDreamBooth: '{path}' is not a HyperDreamBooth checkpoint (format "
                             f"{metadata.get('format')!r}); write one with python -m hyperlora_core.train export")
    if metadata.get("version") != FORMAT_VERSION:
        raise HdbFormatError(f"HyperDreamBooth: '{path}' has format version {metadata.get('version')!r}; this "
                             f"version reads {FORMAT_VERSION!r}. Update the extension.")
    try:
        config = HdbConfig(**json.loads(metadata["hdb"]))
        lidb = json.loads(metadata["lidb"])
        targets = targets_from_dict(json.loads(metadata["targets"]))
        a, c, seed = int(lidb["a"]), int(lidb["b"]), int(lidb["seed"])
    except (KeyError, TypeError, ValueError) as exc:
        raise HdbFormatError(f"HyperDreamBooth: '{path}' has damaged metadata ({exc!r}); export it again.") from exc
    net = HyperDreamBooth(config, targets, a=a, c=c)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for key, shape in expected.items():
        if key not in infos:
            raise HdbFormatError(f"HyperDreamBooth: '{path}' lacks tensor '{key}'; export it again.")
        if tuple(infos[key].shape) != shape:
            raise HdbFormatError(f"HyperDreamBooth: '{path}': tensor '{key}' has shape {list(infos[key].shape)}, "
                                 f"its metadata implies {list(shape)}. Export it again.")
    extra = sorted(set(infos) - set(expected))
    if extra:
        raise HdbFormatError(f"HyperDreamBooth: '{path}' holds unknown tensors: {', '.join(extra[:5])}")
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()}, strict=True)
    return net.to(device).eval().requires_grad_(False), seed


@torch.no_grad()
def predict_lidb(net: HyperDreamBooth, pixels: torch.Tensor, *, seed: int, iterations: int | None = None) -> LiDB:
    """Face pixels [b, 3, s, s] of one person -> their LiDB (the predictions averaged over the b photos)."""
    a_train, b_train = net(pixels.to(next(net.parameters()).device), iterations=iterations)[-1]
    return LiDB(net.targets, a_train.float().mean(0).cpu(), b_train.float().mean(0).cpu(), seed=seed,
                meta={"source": "HyperDreamBooth", "photos": str(len(pixels))})
