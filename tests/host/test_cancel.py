"""Host tier: Cancel (the flag POST /interrupt sets) pressed while our nodes work stops them at once, and nothing is
lost: the cached MODEL samples bit-identically afterwards, and the next prompt runs.

The moment is exact: a test node (HLTestCancelAt) sets the flag from inside the chosen node's own progress update,
after the first photo analysed or the first step of basis mixing.
"""

from __future__ import annotations

import numpy as np
import pytest
from comfy_server import show
from graphs import Graph, generation, saved_image, tiny_model
from verdicts import assert_good_prompt_runs, explain, from_image, loader

from hyperlora_core.basis import PROGRESS_STEPS as MIXING_STEPS  # progress updates of one basis mixing


def cancelled_identity(batch: int) -> Graph:
    """FromImage on ``batch`` copies of one photo, with Cancel pressed after the first is analysed; the MODEL passes
    through the Cancel node, so that it stays in ComfyUI's cache (which keeps only the last prompt's nodes)."""
    g = Graph()
    hl = loader(g)
    photo = g.add("photo_c", "HLTestFaceImage", seed=11, face=True)
    many = g.add("many", "RepeatImageBatch", image=g.out(photo), amount=batch)
    armed = g.add("cancel", "HLTestCancelAt", node="from_image_c", after=1, image=g.out(many), model=tiny_model(g))
    from_image(g, hl, g.out(armed, 1), tag="_c")
    return g


def cancelled_mixing(prefix: str) -> Graph:
    """A generation whose ApplyHyperLoRA is cancelled after its first step of basis mixing."""
    g = generation(prefix=prefix, seed=31)
    g.add("cancel", "HLTestCancelAt", node="apply", after=1, model=g.out("model"))
    g.nodes["apply"]["inputs"]["model"] = g.out("cancel")
    return g


def progress_of(run, node: str) -> list[int]:
    return [m["data"]["value"] for m in run.messages if m["type"] == "progress" and m["data"]["node"] == node]


@pytest.mark.parametrize("where", ["face_analysis", "mixing"])
def test_cancel_stops_our_node_and_leaves_the_cached_model_bit_identical(server, where):
    s = server.server
    before = s.run(generation(prefix=f"before_cancel_{where}", seed=41, with_identity=False).prompt())
    assert before.status == "success", explain(before)
    if where == "face_analysis":
        node, total, run = "from_image_c", 6, s.run(cancelled_identity(6).prompt())
    else:
        node, total, run = "apply", MIXING_STEPS, s.run(cancelled_mixing(f"cancel_{where}").prompt())
    kinds = [m["type"] for m in run.messages]
    stopped = [m["data"] for m in run.messages if m["type"] == "execution_interrupted"]
    show(f"\ncancel during {where}: {node} sent progress {progress_of(run, node)} of {total} (the Cancel lands in "
         f"update 1, before it is sent); interrupted at {stopped[0]['node_id'] if stopped else None}")
    assert stopped and stopped[0]["node_id"] == node, kinds
    assert "execution_success" not in kinds and "execution_error" not in kinds, kinds
    assert max(progress_of(run, node), default=0) < total
    after = s.run(generation(prefix=f"after_cancel_{where}", seed=41, with_identity=False).prompt())
    assert after.status == "success", explain(after)
    assert "model" not in after.executed  # the same cached MODEL object
    assert np.array_equal(saved_image(server, before), saved_image(server, after))
    assert_good_prompt_runs(server, f"cancel_{where}")


