"""Host tier over /prompt, end to end on the tiny models:
LoadHyperLoRA -> HyperLoRAFromImage -> ApplyHyperLoRA -> KSampler -> VAEDecode -> SaveImage."""

from __future__ import annotations

import numpy as np
import pytest
from comfy_server import show
from graphs import generation, saved_image


@pytest.fixture(scope="module")
def with_identity(server):
    run = server.server.run(generation(prefix="e2e_identity", seed=1).prompt())
    assert run.status == "success", (run.error, run.response)
    return run


def test_identity_generation_succeeds_and_changes_the_image(server, with_identity):
    # earlier modules on the shared server may have run the same loader: it may come from ComfyUI's cache
    ran = set(with_identity.executed)
    assert {"sampler", "decode", "save"} <= ran, ran
    assert {"load", "from_image", "apply"} <= ran | set(with_identity.cached), (ran, with_identity.cached)
    plain = server.server.run(generation(prefix="e2e_plain", seed=1, with_identity=False).prompt())
    assert plain.status == "success", (plain.error, plain.response)
    a, b = saved_image(server, with_identity), saved_image(server, plain)
    changed = np.abs(a.astype(int) - b.astype(int))
    show(f"\nidentity vs none: {np.mean(changed > 0):.1%} of pixel values differ, max {changed.max()} levels")
    assert changed.max() >= 8 and np.mean(changed > 0) > 0.2  # the LoRA moves the picture, not a rounding bit


def test_requeue_with_a_new_seed_does_not_analyse_faces_again(server):
    first = server.server.run(generation(prefix="e2e_seed", seed=11).prompt())
    again = server.server.run(generation(prefix="e2e_seed", seed=12).prompt())  # right after: nothing evicted
    assert first.status == again.status == "success", (first.error, again.error)
    assert "sampler" in again.executed and "save" in again.executed
    assert "from_image" not in again.executed and "from_image" in again.cached, (again.executed, again.cached)
    assert "load" not in again.executed and "apply" not in again.executed
    assert not np.array_equal(saved_image(server, again), saved_image(server, first))  # the seed did change
