"""Saving and loading LiDB files (HyperDreamBooth's compact weights) in models/lidb."""

from __future__ import annotations

import logging

import comfy.model_management as mm
import comfy.utils
from comfy_api.latest import io

from ..hyperlora_core.errors import InputValueError
from ..hyperlora_core.lidb import STORAGE, LiDB
from . import folders
from .types import CATEGORY, LidbType

log = logging.getLogger(__name__)


def lidb_lora(lidb: LiDB) -> dict:
    """The LiDB's LoRA in ComfyUI keys. Its aux matrices come from the process's cache, else they are generated
    (seconds for SDXL) with a progress bar, which also stops them when the user cancels the run."""
    pbar = comfy.utils.ProgressBar(len(lidb.targets.linears))

    def progress(done: int, total: int) -> None:
        mm.throw_exception_if_processing_interrupted()
        pbar.update_absolute(done, total)

    return lidb.lora(progress=progress)


class SaveLiDB(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveLiDB",
            display_name="Save LiDB",
            category=CATEGORY,
            description="Writes a LiDB (HyperDreamBooth's compact personalisation: a + b numbers per layer, the "
                        "aux matrices' seed and the layer list) into models/lidb.",
            inputs=[
                LidbType.Input("lidb", tooltip="The LiDB to save (HyperLoRA Refine's lidb output, mode lidb)."),
                io.String.Input("filename_prefix", default="lidb",
                                tooltip="File name (and sub-folder) under models/lidb; a number is appended."),
                io.Combo.Input("storage", options=list(STORAGE), default="fp16",
                               tooltip="fp16: exact to fp16 (SDXL at a=100, b=50: ~171 KB). int8: a per-row scale, "
                                       "error <= 0.4 % of each row's largest number (~89 KB). fp32: exact."),
            ],
            outputs=[io.String.Output(display_name="lidb_name", tooltip="The saved file, as Load LiDB lists it.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, lidb, filename_prefix, storage) -> io.NodeOutput:
        if lidb is None:
            raise InputValueError("lidb is empty: HyperLoRA Refine outputs a LiDB only in mode lidb. Set its mode to "
                                  "lidb.")
        target = folders.save_target(folders.LIDB, filename_prefix)
        lidb.save(target, storage=storage)
        log.info("saved LiDB %s", target)
        return folders.saved_output(folders.LIDB, target)


class LoadLiDB(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadLiDB",
            display_name="Load LiDB",
            category=CATEGORY,
            description="Loads a LiDB file and rebuilds its LoRA (the aux matrices come from the seed it stores). "
                        "Apply the LoRA at 1.0 with Load LoRA Model, or refine it further with HyperLoRA Refine.",
            inputs=[io.Combo.Input("lidb", options=folders.lidbs(), tooltip="A LiDB file in models/lidb.")],
            outputs=[
                LidbType.Output(display_name="lidb", tooltip="The LiDB: a starting point for HyperLoRA Refine."),
                io.LoraModel.Output(display_name="lora", tooltip="Its rank-1 LoRA (ComfyUI keys): load it at 1.0 "
                                                                 "with Load LoRA Model."),
            ],
        )

    @classmethod
    def validate_inputs(cls, lidb) -> bool | str:
        return folders.check_lidb(lidb)

    @classmethod
    def execute(cls, lidb) -> io.NodeOutput:
        weights = LiDB.load(folders.lidb_path(lidb))
        return io.NodeOutput(weights, lidb_lora(weights))
