"""Command line: ``python -m hyperlora_core inspect|doctor|generate|eval``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from .checkpoint import Checkpoint, open_checkpoint
from .errors import HyperLoRAError
from .topology import NAMINGS, SDXL, UNetSpec, diffusers_order, sdxl_modules

log = logging.getLogger("hyperlora_core")


def _naming(checkpoint: Checkpoint) -> str:
    if not checkpoint.modules:
        return "extended (ComfyUI keys)"
    for naming in NAMINGS:
        if all(m.name(naming) == n for m, n in zip(checkpoint.modules, checkpoint.names, strict=True)):
            return naming
    return "mixed"


def _order(checkpoint: Checkpoint) -> str:
    if not checkpoint.modules:
        return "json"
    for label, order in (("SGM (down, mid, up)", sdxl_modules()), ("diffusers (down, up, mid)", diffusers_order())):
        if checkpoint.modules == tuple(order):
            return label
    return "custom (json order is the token order)"


def summary(checkpoint: Checkpoint) -> dict[str, object]:
    """Plain-data description of a checked checkpoint."""
    files = {}
    for role, file in checkpoint.files.items():
        params = sum(_numel(info.shape) for info in file.tensors.values())
        files[file.path.name] = {"role": role, "bytes": file.size, "tensors": len(file.tensors),
                                 "params": params, "dtypes": sorted(file.dtypes())}
    r = checkpoint.resampler
    out: dict[str, object] = {
        "folder": str(checkpoint.folder),
        "fingerprint": checkpoint.fingerprint,
        "family": checkpoint.family,
        "modules": len(checkpoint.targets.modules),
        "linears": len(checkpoint.targets.linears),
        "module_naming": _naming(checkpoint),
        "module_order": _order(checkpoint),
        "target": checkpoint.unet.name if checkpoint.unet is not None else checkpoint.family,
        "basis_size_K": checkpoint.basis.k,
        "id_rank": checkpoint.basis.id_rank,
        "base_rank": checkpoint.basis.base_rank,
        "encoders": list(checkpoint.encoders),
        "resampler": {"dim": r.dim, "depth": r.depth, "heads": r.heads, "dim_head": r.dim_head,
                      "latent_tokens": r.num_queries, "ff_inner": r.ff_inner, "x_width": r.x_dim, "y_width": r.y_dim},
        "base_lora": checkpoint.has_base,
        "files": files,
        "problems": list(checkpoint.notes),
    }
    if checkpoint.id_projector is not None:
        p = checkpoint.id_projector
        out["id_projector"] = {"embed_dim": p.embed_dim, "id_tokens": p.num_tokens, "width": p.width}
    return out


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _print_summary(info: dict[str, object]) -> None:
    lines = [f"checkpoint   {info['folder']}", f"fingerprint  {info['fingerprint']}",
             f"modules      {info['modules']} for {info['target']}, {info['module_naming']} names, "
             f"{info['module_order']} order, {info['linears']} linears",
             f"basis        K={info['basis_size_K']}, ID rank {info['id_rank']}, base rank {info['base_rank']}",
             f"encoders     {' + '.join(info['encoders'])}, Base-LoRA: {'yes' if info['base_lora'] else 'no'}",
             "resampler    " + ", ".join(f"{k} {v}" for k, v in info["resampler"].items())]
    if "id_projector" in info:
        lines.append("id projector " + ", ".join(f"{k} {v}" for k, v in info["id_projector"].items()))
    for name, f in info["files"].items():
        lines.append(f"file         {name}: {f['bytes'] / 2**20:.1f} MiB, {f['tensors']} tensors, "
                     f"{f['params'] / 1e6:.3f} M params, {'/'.join(f['dtypes'])}")
    problems = info["problems"] or ["none"]
    lines += [f"problems     {p}" for p in problems]
    sys.stdout.write("\n".join(lines) + "\n")


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import format_table, run_doctor

    checks = run_doctor(Path(args.models))
    sys.stdout.write(format_table(checks) + "\n")
    return 1 if any(c.status == "problem" for c in checks) else 0


def _generate(args: argparse.Namespace) -> int:
    from .clip import ClipVisionEncoder
    from .face import FaceAnalyzer
    from .images import load_image
    from .lora_io import save_lora
    from .model import load_hyperlora
    from .pipeline import CropOptions, IdentityPipeline

    try:
        hl = load_hyperlora(args.checkpoint, device=args.device, dtype=args.dtype, unet=args.unet)
        clip = ClipVisionEncoder.from_folder(args.clip, device=args.device) if "clip" in hl.encoders else None
        faces = FaceAnalyzer(args.insightface, providers=args.provider)
        images = [load_image(p) for p in args.image]
        pipeline = IdentityPipeline(hl, faces, clip)
        options = CropOptions(remove_background=not args.keep_background, grayscale=args.grayscale,
                              face_index=args.face_index)
        identity, conditions = pipeline.identity(images, options, "skip" if args.skip_failed else "error")
        lora = hl.identity_to_lora(identity, key_format="kohya")
    except (HyperLoRAError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    save_lora(lora, args.out, metadata={"hyperlora_fingerprint": hl.fingerprint})
    if args.identity:
        identity.save(args.identity)
    report = "\n".join(conditions.reports)
    sys.stdout.write(f"{report}\nface analysis on {faces.provider}; wrote {args.out} ({len(lora) // 3} layers)\n")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import face_similarity
    from .face import FaceAnalyzer
    from .images import load_image

    try:
        faces = FaceAnalyzer(args.insightface, providers=args.provider)
        result = face_similarity(faces, [load_image(p) for p in args.images],
                                 [load_image(p) for p in args.references])
    except (HyperLoRAError, ValueError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
    if args.json:
        sys.stdout.write(json.dumps({"mean": result.mean, "scores": dict(zip(args.images, result.scores,
                                                                               strict=True)),
                                     "no_face": [args.images[i] for i in result.missing]}, indent=2) + "\n")
    else:
        lines = [f"{score:.4f}  {path}" + ("  (no face)" if i in result.missing else "")
                 for i, (path, score) in enumerate(zip(args.images, result.scores, strict=True))]
        lines.append(f"mean ArcFace cosine to {len(args.references)} reference(s): {result.mean:.4f} "
                     f"({len(result.missing)} of {len(args.images)} images without a face)")
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _unet_spec(text: str) -> UNetSpec:
    try:
        w1, w2, ctx = (int(v) for v in text.split(","))
        return UNetSpec(name=f"UNet {text}", level_widths=(w1, w2), context_dim=ctx)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--unet takes three positive integers like 640,1280,2048 ({exc})") from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperlora_core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    ins = sub.add_parser("inspect", help="check a checkpoint folder and print its dimensions")
    ins.add_argument("folder", help="folder with hyper_lora_modules.json and the .safetensors files")
    ins.add_argument("--dim-head", type=int, default=None, help="resampler head width if not the release's 64")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")
    ins.add_argument("--unet", type=_unet_spec, default=SDXL, metavar="W1,W2,CTX",
                     help="check against a UNet with these attention widths and context width (default SDXL)")
    doc = sub.add_parser("doctor", help="check every file and package the nodes need, with fixes")
    doc.add_argument("--models", required=True, help="ComfyUI's models folder")
    gen = sub.add_parser("generate", help="photos -> identity LoRA (kohya keys, loads in ComfyUI's LoraLoader)")
    gen.add_argument("--checkpoint", required=True, help="HyperLoRA checkpoint folder")
    gen.add_argument("--clip", help="CLIP ViT-L/14 folder (config.json + model.safetensors) or .safetensors")
    gen.add_argument("--insightface", required=True, help="antelopev2 folder")
    gen.add_argument("--image", required=True, nargs="+", help="one or more photos of the same person")
    gen.add_argument("--out", required=True, help="LoRA file to write (.safetensors)")
    gen.add_argument("--identity", help="also write the identity (.safetensors)")
    gen.add_argument("--keep-background", action="store_true", help="do not grey out the background")
    gen.add_argument("--grayscale", action="store_true", help="feed CLIP a grey face crop")
    gen.add_argument("--face-index", type=int, default=None, help="k-th face from the left (default: largest)")
    gen.add_argument("--skip-failed", action="store_true", help="leave out photos without a usable face")
    gen.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"), help="onnxruntime provider")
    gen.add_argument("--device", default=None, help="torch device (default cpu)")
    gen.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    gen.add_argument("--unet", type=_unet_spec, default=SDXL, metavar="W1,W2,CTX", help=argparse.SUPPRESS)
    ev = sub.add_parser("eval", help="face similarity (ArcFace cosine) of generated images to reference photos")
    ev.add_argument("--images", required=True, nargs="+", help="generated images")
    ev.add_argument("--references", required=True, nargs="+", help="photos of the person")
    ev.add_argument("--insightface", required=True, help="antelopev2 folder")
    ev.add_argument("--provider", default="auto", choices=("auto", "cpu", "cuda"), help="onnxruntime provider")
    ev.add_argument("--json", action="store_true", help="print the scores as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "doctor":
        return _doctor(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "eval":
        return _eval(args)
    try:
        checkpoint = open_checkpoint(args.folder, unet=args.unet, dim_head=args.dim_head)
    except HyperLoRAError as exc:
        sys.stdout.write(f"checkpoint   {args.folder}\nproblems     {exc}\n")
        return 1
    info = summary(checkpoint)
    if args.json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
    else:
        _print_summary(info)
    return 0
