"""Host tier: bad inputs over /prompt give an execution_error raised by our code, with our text, and the server
keeps answering."""

from __future__ import annotations

import shutil

import pytest
from comfy_server import show
from graphs import Graph, apply, conditioning, decode_and_save, identity, sample

GENERIC = {"AssertionError", "KeyError", "IndexError", "TypeError", "AttributeError", "RuntimeError",
           "ZeroDivisionError", "UnboundLocalError", "NameError"}


def raised_by_us(error: dict) -> bool:
    """The innermost frame of the traceback is in this package (nodes/ or hyperlora_core/)."""
    return bool(error.get("traceback")) and "ComfyUI-HyperLoRA" in error["traceback"][-1]


def explain(run) -> str:
    if run.error:
        return f"{run.error['node_type']}: {run.error['exception_type']}: {run.error['exception_message']}\n" + \
            "".join(run.error["traceback"][-3:])
    return f"HTTP {run.http_status}: {run.response}"


def preview_identity(g: Graph, ident_node: str = "from_image") -> None:
    g.add("preview", "PreviewImage", images=[ident_node, 1])


def no_face() -> Graph:
    g = Graph()
    identity(g, face=False)
    preview_identity(g)
    return g


def corrupt_checkpoint() -> Graph:
    g = Graph()
    identity(g, checkpoint="tiny_corrupt", tag="_corrupt")
    preview_identity(g, "from_image_corrupt")
    return g


def generate_with(model_node: str, **model_inputs) -> Graph:
    g = Graph()
    model = g.out(g.add("other_model", model_node, seed=0, **model_inputs))
    hl, ident = identity(g)
    positive, negative = conditioning(g)
    decode_and_save(g, sample(g, apply(g, model, hl, ident), positive, negative), "bad")
    return g


def foreign_identity() -> Graph:
    g = Graph()
    model = g.out(g.add("model", "HLTestTinySDXL", seed=0, model_channels=32))
    _, ident = identity(g, checkpoint="tiny_a")
    other = g.add("load_b", "LoadHyperLoRA", checkpoint="tiny_b", face_analyzer="models/antelopev2",
                  provider="cpu", dtype="fp32")
    positive, negative = conditioning(g)
    decode_and_save(g, sample(g, apply(g, model, g.out(other), ident), positive, negative), "bad")
    return g


# case -> (graph, node that must fail, words its message must hold (lower case))
CASES = {
    "image_without_a_face": (no_face, "HyperLoRAFromImage", ("face", "photo 1")),
    "corrupted_safetensors": (corrupt_checkpoint, None, ("hyper_lora_modules.safetensors",)),
    "sd15_model": (lambda: generate_with("HLTestTinySD15"), "ApplyHyperLoRA", ("sdxl", "transformer_blocks")),
    "sdxl_of_other_widths": (lambda: generate_with("HLTestTinySDXL", model_channels=64), "ApplyHyperLoRA",
                             ("sizes", "transformer_blocks")),
    "identity_of_another_checkpoint": (foreign_identity, "ApplyHyperLoRA", ("checkpoint",)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_gives_our_error(server, case):
    build, node_type, words = CASES[case]
    run = server.server.run(build().prompt())
    show(f"\n{case}: {explain(run)}")
    assert run.http_status == 200 and run.status == "error" and run.error, explain(run)
    error = run.error
    if node_type is not None:
        assert error["node_type"] == node_type, explain(run)
    else:
        assert error["node_type"] in ("LoadHyperLoRA", "HyperLoRAFromImage", "ApplyHyperLoRA"), explain(run)
    assert raised_by_us(error) and error["exception_type"].split(".")[-1] not in GENERIC, explain(run)
    message = error["exception_message"].lower()
    assert all(w in message for w in words), explain(run)
    assert "sampler" not in run.executed  # refused before sampling
    assert server.server.alive()


def test_missing_checkpoint_is_named(server):
    """A checkpoint folder removed after the page was loaded: ComfyUI's validation or our node must name it."""
    shutil.rmtree(server.models / "hyper_lora" / "tiny_gone")
    g = Graph()
    identity(g, checkpoint="tiny_gone", tag="_gone")
    preview_identity(g, "from_image_gone")
    run = server.server.run(g.prompt())
    if run.http_status == 400:  # validation: the combo no longer offers it
        errors = run.response["node_errors"]["load_gone"]["errors"]
        show(f"\nmissing checkpoint: refused by ComfyUI's validation: {errors}")
        assert any(e["type"] in ("value_not_in_list", "custom_validation_failed") and "tiny_gone" in e["details"]
                   for e in errors), errors  # custom: LoadHyperLoRA.validate_inputs, with the available choices
        assert any(e["extra_info"]["input_name"] == "checkpoint" for e in errors), errors
    else:
        show(f"\nmissing checkpoint: {explain(run)}")
        assert run.error and run.error["node_type"] == "LoadHyperLoRA" and raised_by_us(run.error), explain(run)
        assert "tiny_gone" in run.error["exception_message"], explain(run)
        assert run.error["exception_type"].endswith("CheckpointFileMissing"), explain(run)
    assert server.server.alive()
