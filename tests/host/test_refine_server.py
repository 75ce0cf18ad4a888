"""Host tier over /prompt: HyperLoRARefine in a graph on the real server, and a user interrupt in the middle of it."""

from __future__ import annotations

import numpy as np
from comfy_server import show
from graphs import generation, refinement, saved_image


def test_refine_graph_runs_and_changes_the_picture(server):
    s = server.server
    run = s.run(refinement(prefix="refine_graph", steps=3).prompt(), timeout=300)
    assert run.status == "success", (run.error, s.log_tail())
    progress = [m["data"]["value"] for m in run.messages if m["type"] == "progress" and m["data"]["node"] == "refine"]
    assert progress[-1] == 3, progress  # the progress bar reached the last step
    curve = saved_image(server, run, "curve")
    assert curve.shape == (256, 512, 3) and curve.min() < 128  # a drawn curve, not a blank image
    plain = s.run(generation(prefix="refine_plain", seed=1, with_identity=False).prompt())
    assert plain.status == "success", plain.error
    changed = np.abs(saved_image(server, run).astype(int) - saved_image(server, plain).astype(int))
    show(f"\nrefined LoRA vs none: {np.mean(changed > 0):.1%} of pixel values differ, max {changed.max()} levels")
    assert changed.max() >= 8


def test_interrupt_mid_run_leaves_the_model_and_server_as_they_were(server):
    s = server.server
    before = s.run(generation(prefix="before_interrupt", seed=5, with_identity=False).prompt())
    assert before.status == "success", before.error
    g = refinement(prefix="interrupted", steps=5000)
    # Cancel pressed inside the refine node's own step-2 progress update (the flag POST /interrupt sets): a client
    # that posts /interrupt on a websocket message lags thousands of fast tiny steps behind on a busy machine
    g.add("cancel", "HLTestCancelAt", node="refine", after=2, model=g.out("model"))
    g.nodes["refine"]["inputs"]["model"] = g.out("cancel")
    run = s.run(g.prompt(), timeout=300)
    kinds = [m["type"] for m in run.messages]
    steps_done = max((m["data"]["value"] for m in run.messages if m["type"] == "progress"
                      and m["data"]["node"] == "refine"), default=0)
    stopped = [m["data"]["node_id"] for m in run.messages if m["type"] == "execution_interrupted"]
    show(f"\ncancel pressed at step 2; the run stopped in {stopped} after step {steps_done} of 5000")
    assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds[-3:]
    assert stopped == ["refine"] and steps_done < 2
    assert s.alive()
    # the same MODEL object (cached by ComfyUI) samples exactly as before: nothing of the run was left on it
    after = s.run(generation(prefix="after_interrupt", seed=5, with_identity=False).prompt())
    assert after.status == "success", after.error
    assert "model" not in after.executed
    assert np.array_equal(saved_image(server, before), saved_image(server, after))
