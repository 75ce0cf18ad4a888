"""``python -m hyperlora_core.train run|export|prepare|lidb-preopt``: the same command on one device or under
torchrun."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import HyperLoRAError
from .config import HDB, TrainConfig, TrainConfigError, load_config

log = logging.getLogger("hyperlora_core.train")


def build_backend(config: TrainConfig):
    """(denoiser, training data) for ``config.data``."""
    data = config.data
    if data.backend == "toy":
        from .toy import SyntheticIdentities, ToyDenoiser, pretrain

        identities = SyntheticIdentities(data.toy_identities, data.toy_images, clip_dim=config.model.clip_dim,
                                         embed_dim=config.model.embed_dim, face_side=config.hdb.image_size)
        return pretrain(ToyDenoiser(), identities, steps=data.toy_pretrain), identities
    import importlib

    from ..clip import ClipVisionEncoder
    from .shards import ShardDataset

    backend = importlib.import_module("train_comfy.backend")  # the host side: ComfyUI as a library
    denoiser, vae = backend.load_comfy_denoiser(data, device=config.run.device, precision=config.run.precision)
    clip = ClipVisionEncoder.from_folder(data.clip_vision, device=denoiser.device)
    encode = backend.shard_encoder(vae, clip, resolution=data.resolution, device=denoiser.device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return denoiser, ShardDataset(data.shards, rank=rank, world=world, encode=encode)


def build_validation(config: TrainConfig, denoiser, data):
    """The validation function of ``config`` (None when there is nothing to validate on); rank 0 runs it."""
    from .validate import toy_validation

    if config.data.backend == "toy":
        return toy_validation(denoiser, data, config.stage, config.validation)
    if not config.data.validation_shards or not config.run.validate_every:
        return None
    from .shards import ShardDataset
    from .validate import check_references, held_out_identities, shard_validation

    held = ShardDataset(config.data.validation_shards, encode=data.encode)
    samples = min(len(held), config.data.validation_samples)
    analyzer, identities = None, []
    rank = dist.get_rank() if dist.is_initialized() else 0
    if config.validation.insightface and rank == 0:
        from ..face import FaceAnalyzer

        analyzer = FaceAnalyzer(config.validation.insightface, providers=config.validation.provider)
        identities = held_out_identities(held, samples, config.validation.identities)
        check_references(analyzer, identities)
    return shard_validation(denoiser, held.get(list(range(samples))), config.stage, identities=identities,
                            settings=config.validation, analyzer=analyzer)


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")


def _run(args: argparse.Namespace) -> int:
    from .loop import Trainer, latest_checkpoint

    config = load_config(args.config)
    if args.shard:
        config = config.replace(run={"shard": True})
    if args.steps:
        config = config.replace(optim={"steps": args.steps})
    _init_distributed()
    denoiser, data = build_backend(config)
    if config.stage.stage == HDB:
        data, validate = _hdb_data(config, denoiser, data)
    else:
        validate = build_validation(config, denoiser, data)
    trainer = Trainer(config, denoiser, data, validate=validate)
    resume = latest_checkpoint(config.run.out) if args.resume == "auto" else args.resume
    if resume:
        trainer.resume(resume)
        log.info("resumed from %s at step %d", resume, trainer.step)
    trainer.train(until=args.until)
    if trainer.step >= config.optim.steps and args.export:
        _export(trainer, Path(args.export))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _hdb_data(config: TrainConfig, denoiser, data):
    """(training data with the pre-optimised LiDB weights attached, the validation function) for stage "hdb"."""
    from .hdb_stage import SupervisedData, Supervision, target_layers, toy_hdb_validation

    if not config.hdb.supervision:
        if config.hdb.weight_loss:
            raise TrainConfigError("hdb.supervision is empty: run lidb-preopt first and give its --out folder")
        return SupervisedData(data, None), None
    supervision = Supervision(config.hdb.supervision, data.labels(), target_layers(denoiser), a=config.lidb.a,
                              c=config.lidb.b, seed=config.lidb.seed)
    validate = toy_hdb_validation(data, supervision) if config.data.backend == "toy" else None
    if config.data.backend != "toy" and config.data.validation_shards:
        from .hdb_stage import shard_hdb_validation
        from .shards import ShardDataset

        held = ShardDataset(config.data.validation_shards, encode=data.encode)
        validate = shard_hdb_validation(denoiser, held.get(list(range(min(len(held),
                                                                          config.data.validation_samples)))), config)
    return SupervisedData(data, supervision), validate


def _export(trainer, folder: Path) -> None:
    from .export import export_checkpoint
    from .hypernet import HyperNetwork

    weights = trainer.full_weights()
    if trainer.rank == 0 and trainer.config.stage.stage == HDB:
        from ..hdb.checkpoint import save_hdb

        net = trainer.stage.build(trainer.config, trainer.denoiser, init=False)
        net.load_state_dict(weights, strict=True)
        save_hdb(net, folder, seed=trainer.config.lidb.seed)
        sys.stdout.write(f"exported {folder}\n")
    elif trainer.rank == 0:
        net = HyperNetwork(trainer.config.model, trainer.denoiser.targets)
        net.load_state_dict(weights, strict=True)
        export_checkpoint(net, folder, training={"step": trainer.step, "config": trainer.config.to_dict()})
        sys.stdout.write(f"exported {folder}\n")


def _export_cmd(args: argparse.Namespace) -> int:
    """A training checkpoint (step folder) -> the released format, using its stored config."""
    import json

    from safetensors.torch import load_file

    from .export import export_checkpoint
    from .hypernet import HyperNetwork
    from .loop import stored_targets

    step = Path(args.checkpoint)
    if not (step / "state.json").is_file():
        raise FileNotFoundError(f"'{step}' is not a training checkpoint (no state.json); give a step_<n> folder")
    state = json.loads((step / "state.json").read_text())
    config = TrainConfig.from_dict(state["config"])
    targets = stored_targets(state, str(step / "state.json"))
    weights = load_file(str(step / "weights.safetensors"))
    if not args.no_ema and (step / "ema.safetensors").exists():
        weights.update(load_file(str(step / "ema.safetensors")))
    if config.stage.stage == HDB:  # one file, not the released folder
        from types import SimpleNamespace

        from ..hdb.checkpoint import save_hdb
        from .stages import STAGES

        net = STAGES[HDB].build(config, SimpleNamespace(targets=targets), init=False)
        net.load_state_dict(weights, strict=True)
        save_hdb(net, args.out, seed=config.lidb.seed)
        sys.stdout.write(f"exported {args.out}\n")
        return 0
    net = HyperNetwork(config.model, targets)
    net.load_state_dict(weights, strict=True)
    export_checkpoint(net, args.out, training={"step": state["step"], "config": state["config"]})
    sys.stdout.write(f"exported {args.out}\n")
    return 0


def _preopt(args: argparse.Namespace) -> int:
    """LiDB pre-optimisation of every identity of the config's data set (this rank's share under torchrun)."""
    from .preopt import run_preopt

    config = load_config(args.config)
    out = args.out or config.hdb.supervision
    if not out:
        raise TrainConfigError("give --out, or set hdb.supervision in the config: the folder for the LiDB files")
    _init_distributed()
    denoiser, data = build_backend(config)
    if config.data.backend != "toy":  # ranks split identities, not shards: every rank indexes every shard
        from .shards import ShardDataset

        data = ShardDataset(config.data.shards, encode=data.encode)
    device = getattr(denoiser, "device", None) or torch.device("cpu")
    done = run_preopt(config, denoiser, data, out, device=device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    sys.stdout.write(f"rank {rank}: pre-optimised {len(done)} identities into {out}: {' '.join(done)}\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperlora_core.train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train one stage (also under torchrun --nproc_per_node N)")
    run.add_argument("--config", required=True, help="the stage's TOML file ([model] [stage] [optim] [run] [data])")
    run.add_argument("--shard", action="store_true", help="FSDP fully_shard the hypernetwork (bases + optimiser)")
    run.add_argument("--resume", default="auto", help="'auto' (latest step_* in run.out), a step folder, or ''")
    run.add_argument("--until", type=int, default=None, help="stop after this step (a later run resumes)")
    run.add_argument("--steps", type=int, default=None, help="override optim.steps")
    run.add_argument("--export", default="", help="after the last step, write the released format here (stage 'hdb': "
                     "a .safetensors file)")
    exp = sub.add_parser("export", help="a training checkpoint -> the released checkpoint folder (fp16); for stage "
                         "'hdb', one HyperDreamBooth .safetensors file")
    exp.add_argument("checkpoint", help="a step_<n> folder written by run")
    exp.add_argument("--out", required=True, help="checkpoint folder to write")
    exp.add_argument("--no-ema", action="store_true", help="export the raw weights even if there is an EMA")
    pre = sub.add_parser("lidb-preopt", help="LiDB fine-tuning of every identity of the data set (the HyperDreamBooth "
                         "supervision); distributed and resumable")
    pre.add_argument("--config", required=True, help="a TOML file: [data] the data set, [lidb] sizes and steps, "
                     "[stage] the trigger words")
    pre.add_argument("--out", default="", help="folder of the LiDB files (default: hdb.supervision)")
    prep = sub.add_parser("prepare", help="a folder of portraits -> tar shards (faces analysed once, filtered)")
    from .prepare import add_arguments

    add_arguments(prep)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "export":
            return _export_cmd(args)
        if args.command == "lidb-preopt":
            return _preopt(args)
        from .prepare import run_prepare

        return run_prepare(args)
    except (HyperLoRAError, FileNotFoundError) as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 1
