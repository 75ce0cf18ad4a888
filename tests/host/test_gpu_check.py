"""Host tier: bench/gpu_check.py runs its whole code path on tiny models on the CPU, so the GPU script cannot rot.

Only the report's shape and the facts that do not depend on speed are checked (no timing assertion).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from comfy_server import show

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_tiny_on_the_cpu(comfy, tmp_path):
    out = tmp_path / "report.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--comfyui", os.environ["COMFYUI_PATH"],
           "--size", "tiny", "--device", "cpu", "--workdir", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          timeout=2400, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    show("\n" + done.stdout)
    report = json.loads(out.read_text())
    assert set(report["predict_mix_s"]) == {"1", "4"}
    assert report["sampling"]["identity_changes_the_image"]
    rows = {(r["mode"], r["checkpointing"]) for r in report["refine"]}
    assert rows == {(m, c) for m in ("rank_relaxed", "coefficients") for c in (True, False)}
    for row in report["refine"]:
        assert row["steps"] == 2 and row["lora_pairs"] == 560
        assert math.isfinite(row["first_loss"]) and math.isfinite(row["last_loss"])
        assert row["saved_bytes"] > 0 and row["peak_bytes"] > 0
    steps = [row["step"] for row in report["training"]["rows"]]
    assert steps == ["plain LoRA (rank 4)"] + [f"HyperLoRA stage {n}" for n in (1, 2, 3)]
    assert all(row["s"] > 0 for row in report["training"]["rows"])
    assert "refine mode" in done.stdout and "sampling:" in done.stdout and "HyperLoRA stage 3" in done.stdout
