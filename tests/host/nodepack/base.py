"""What the test node pack's nodes share: the seed input, a node that builds one thing from a seed, and writing
weights to ComfyUI's output folder for a test to read."""

from __future__ import annotations

from pathlib import Path

CATEGORY = "hyperlora_test"
SEED = ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "seed of the random weights / pixels"})


class SeededBuilder:
    """A node that builds one object from a seed: a subclass sets RETURN_TYPES and ``make`` (seed -> object)."""

    CATEGORY = CATEGORY
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": SEED}}

    def build(self, seed):
        return (self.make(seed),)


class AlwaysRunsOutput:
    """An output node that runs again whenever a prompt holding it is queued (IS_CHANGED is NaN, which equals
    nothing): a subclass sets FUNCTION and INPUT_TYPES."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ()
    OUTPUT_NODE = True

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")


def save_output(name: str, weights: dict, meta: dict[str, str]) -> dict:
    """Write ``weights`` with ``meta`` to output/<name>.safetensors; the output node's ui, which names the file."""
    import folder_paths
    import safetensors.torch

    path = Path(folder_paths.get_output_directory()) / f"{name}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(weights, str(path), metadata=meta)
    return {"ui": {"dump": [{"path": str(path), **meta, "weights": len(weights)}]}}
