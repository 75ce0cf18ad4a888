"""Benchmark of HyperLoRA Refine: seconds per step, peak memory and bytes saved for backward, per mode and
gradient checkpointing.

    COMFYUI_PATH=/path/to/ComfyUI python bench/refine.py [--size tiny|full] [--device cpu|cuda] [--resolution 512]
                                                         [--steps 3]

``tiny``: the host tier's 23.6 M-parameter SDXL-topology UNet (140 attention modules, real names), fp32.
``full``: a full-size SDXL UNet (2.57 G parameters) with random fp16 weights, computing in bf16, and a full-size
random HyperLoRA (K=128, r=8, fp16). The UNet is built inside ``torch.inference_mode()``, as ComfyUI loads models.
Each configuration runs in its own process, so its peak is its own; a configuration whose RSS passes
``--rss-limit-gib`` is stopped and reported as such (this machine is shared). The references are encoded by a
stand-in encoder (pooling to the latent shape); the first step warms up and is not timed. Bytes saved for
backward are counted with autograd's saved-tensor hooks (deduplicated by storage; the model's own weights, saved
by reference, are not counted); the figure is the largest of the steps.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [("rank_relaxed", True), ("coefficients", True), ("rank_relaxed", False), ("coefficients", False)]
FULL_SDXL = {"model_channels": 320, "context_dim": 2048, "adm_in_channels": 2816, "num_head_channels": 64}


def comfy_modules(comfyui: str, device: str):
    sys.path[:0] = [comfyui, str(ROOT), str(ROOT / "tests" / "host"), str(ROOT / "tests")]
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    import comfy.model_management
    import comfy.sd  # noqa: F401
    import comfy.supported_models

    return comfy


def pack_handle():
    """This checkout's nodes/handle.py (the HYPER_LORA handle and its memory helpers)."""
    pack_modules()
    from hlpack.nodes import handle

    return handle


def pack_modules():
    """This checkout loaded as the package ComfyUI would load (its nodes use relative imports)."""
    if "hlpack" not in sys.modules:
        spec = importlib.util.spec_from_file_location("hlpack", ROOT / "__init__.py",
                                                      submodule_search_locations=[str(ROOT)])
        module = importlib.util.module_from_spec(spec)
        sys.modules["hlpack"] = module
        spec.loader.exec_module(module)
    from hlpack.hyperlora_core import refine
    from hlpack.nodes import training

    return refine, training


class PoolEncoder:
    """A stand-in VAE encoder: [b, h, w, 3] -> [b, 4, h/8, w/8] by a fixed projection and 8x8 pooling."""

    def encode(self, pixels):
        import torch

        x = pixels.movedim(-1, 1)
        x = torch.cat([x, x.mean(dim=1, keepdim=True)], dim=1) * 2 - 1
        return torch.nn.functional.avg_pool2d(x, 8)


def write_full_checkpoint(folder: Path) -> Path:
    if not (folder / "hyper_lora_modules.safetensors").exists():
        sys.path.insert(0, str(ROOT / "bench"))
        from core import write

        write(folder)
    return folder


def build(size: str, workdir: Path):
    """(ModelPatcher, HyperLoRA, positive conditioning) at ``size``; the UNet's weights are inference tensors."""
    import comfy.supported_models
    import torch
    from nodepack import tiny

    from hyperlora_core import SDXL, load_hyperlora
    from hyperlora_core.synthetic import write_checkpoint

    if size == "tiny":
        with torch.inference_mode():
            model = tiny.tiny_sdxl(seed=0)
        unet = tiny.host_unet()
        folder = workdir / "ckpt_tiny"
        if not (folder / "hyper_lora_modules.safetensors").exists():
            write_checkpoint(folder, unet=unet)
        cond = [[torch.randn(1, 77, 64), {"pooled_output": torch.randn(1, 32)}]]
        return model, load_hyperlora(folder, unet=unet), cond
    supported = comfy.supported_models.SDXL(dict(tiny.TINY_SDXL_CONFIG, **FULL_SDXL))
    supported.set_inference_dtype(torch.float16, None)
    with torch.inference_mode():
        net = supported.get_model({})
        tiny.randomise(net, 0)
    cond = [[torch.randn(1, 77, 2048), {"pooled_output": torch.randn(1, 1280)}]]
    return tiny._patcher(net), load_hyperlora(write_full_checkpoint(workdir / "ckpt_full"), unet=SDXL), cond


def predicted_identity(hl, photos: int = 1, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return hl.predict_identity(clip_tokens=torch.randn(photos, 257, 1024, generator=g),
                               id_embeds=torch.nn.functional.normalize(torch.randn(photos, 512, generator=g), dim=-1))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def heap_free() -> int:
    """Bytes glibc's heap holds free (not given back to the system); 0 where that cannot be read."""
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return 0
    fn.restype = _MallInfo2
    return int(fn().fordblks)


def rss_now() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes of this process."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(status["RssAnon"].split()[0]) * 1024, int(status["RssFile"].split()[0]) * 1024


class Timeline:
    """RSS sampled every ``every`` seconds in a thread; for each phase (set by ``phase = ...``) the highest
    anonymous + file-backed RSS and, at that moment, each part and glibc's free heap bytes."""

    def __init__(self, every: float = 0.25) -> None:
        self.phase, self.peaks, self.order = "setup", {}, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def sample(self) -> None:
        anon, file = rss_now()
        phase = self.phase
        if phase not in self.order:
            self.order.append(phase)
        if anon + file > self.peaks.get(phase, {}).get("rss", -1):
            self.peaks[phase] = {"rss": anon + file, "anon": anon, "file": file, "heap_free": heap_free()}

    def _run(self, every: float) -> None:
        while not self._stop.wait(every):
            self.sample()

    def set(self, phase: str) -> None:
        self.sample()
        if phase != self.phase:
            anon, file = rss_now()
            sys.stderr.write(f"  [{time.strftime('%H:%M:%S')}] {phase}: RSS now {anon / 2**30:.2f} GiB anonymous + "
                             f"{file / 2**30:.2f} GiB file-backed\n")
        self.phase = phase
        self.sample()

    def stop(self) -> list[dict]:
        self._stop.set()
        self._thread.join()
        self.sample()
        return [dict(phase=p, **self.peaks[p]) for p in self.order]


def phase_table(phases: list[dict]) -> str:
    gib = 2 ** 30
    lines = [f"  {'phase':<28}{'peak RSS':>10}{'anon':>8}{'file':>8}{'heap free':>11}"]
    lines += [f"  {p['phase']:<28}{p['rss'] / gib:>10.2f}{p['anon'] / gib:>8.2f}{p['file'] / gib:>8.2f}"
              f"{p['heap_free'] / gib:>11.2f}" for p in phases]
    return "\n".join(lines) + "  (GiB)\n"


class SavedBytes:
    """Bytes saved for backward per step (autograd saved-tensor hooks), deduplicated by storage, without the
    storages in ``skip`` (the model's own weights, saved by reference)."""

    def __init__(self, skip: set[int]) -> None:
        self.skip, self.seen, self.current, self.steps = skip, set(), 0, []

    def pack(self, t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.seen and ptr not in self.skip:
            self.seen.add(ptr)
            self.current += storage.nbytes()
        return t

    def next_step(self) -> None:
        self.steps.append(self.current)
        self.seen, self.current = set(), 0


def _phases(training, model, timeline: Timeline | None, ends: list[float]) -> list:
    """Marks the timeline's phases: the prediction (mixing), loading, and each step's forward and backward.
    Returns what ``_unmark`` undoes."""
    if timeline is None:
        return []
    make_lora = training.make_lora

    def marked(*args, **kwargs):
        timeline.set("prediction (mix)")
        try:
            return make_lora(*args, **kwargs)
        finally:
            timeline.set("load, encode")

    training.make_lora = marked
    unet = model.model.diffusion_model
    return [(training, "make_lora", make_lora),
            unet.register_forward_pre_hook(lambda *_: timeline.set(f"step {len(ends) + 1} forward")),
            unet.register_forward_hook(lambda *_: timeline.set(f"step {len(ends) + 1} backward, optimiser"))]


def _unmark(marks: list) -> None:
    for mark in marks:
        if isinstance(mark, tuple):
            setattr(*mark)
        else:
            mark.remove()


def run_refine(training, refine_mod, model, hl, positive, images, mode: str, checkpointing: bool, steps: int,
               precision: str, sync, timeline: Timeline | None = None) -> dict:
    """One refinement run, timed per step (the node's progress bar marks each step's end) and its saved bytes
    counted. The first step also encodes and loads, so s/step is the median of the later steps. ``timeline``:
    marks its phases (prediction, loading, each step's forward and backward)."""
    import comfy.utils
    import torch

    if timeline is not None:
        timeline.set("predict identity")
    identity = predicted_identity(hl)
    hl.release_networks()  # as the nodes do on a CPU-only machine once an identity is predicted
    pack_handle().return_freed_memory()
    handle = type("Handle", (), {"core": hl})()
    config = refine_mod.RefineConfig(mode=mode, steps=steps, seed=0, resolution=images.shape[1])
    saved = SavedBytes({p.untyped_storage().data_ptr() for p in model.model.parameters()})
    ends: list[float] = []

    def step_done(value, total, preview, node_id=None):
        if total != steps or value != len(ends) + 1:  # another bar (the prediction's mixing)
            return
        sync()
        ends.append(time.perf_counter())
        saved.next_step()
        took = ends[-1] - (ends[-2] if len(ends) > 1 else t0)
        sys.stderr.write(f"  {mode}, checkpointing {checkpointing}: step {value}/{total} took {took:.1f} s, saved "
                         f"{saved.steps[-1] / 2**30:.3f} GiB, max RSS so far "
                         f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB\n")
        sys.stderr.flush()

    previous = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(step_done)
    marks = _phases(training, model, timeline, ends)
    try:
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            t0 = time.perf_counter()
            result, losses = training.refine(model, PoolEncoder(), positive, handle, identity, images, config,
                                             precision=precision, checkpointing=checkpointing)
            total = time.perf_counter() - t0
    finally:
        comfy.utils.set_progress_bar_global_hook(previous)
        _unmark(marks)
        if timeline is not None:
            timeline.set("after")
    times = [b - a for a, b in zip([t0, *ends], ends, strict=False)]
    return {"step_s": statistics.median(times[1:] or times), "first_step_s": times[0], "total_s": total,
            "saved_bytes": max(saved.steps), "first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses),
            "lora": result.lora}


def one(args) -> dict:
    """One configuration in this process."""
    comfy_modules(args.comfyui, args.device)
    import torch

    torch.set_num_threads(args.threads)
    refine_mod, training = pack_modules()
    timeline = Timeline()
    mode, checkpointing = args.one.split(":")
    model, hl, positive = build(args.size, Path(args.workdir))
    weights = sum(p.numel() * p.element_size() for p in model.model.diffusion_model.parameters())
    images = torch.rand(1, args.resolution, args.resolution, 3, generator=torch.Generator().manual_seed(0))
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    setup_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = run_refine(training, refine_mod, model, hl, positive, images, mode, checkpointing == "ckpt", args.steps,
                     "bf16" if args.size == "full" else "auto", torch.cuda.synchronize if cuda else lambda: None,
                     timeline)
    row.pop("lora")
    row["phases"] = timeline.stop()
    sys.stderr.write(f"  {mode}, checkpointing {checkpointing}, RSS by phase:\n{phase_table(row['phases'])}")
    row.update(mode=mode, checkpointing=checkpointing == "ckpt", weights_bytes=weights, setup_rss_bytes=setup_rss,
               peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
               peak_cuda_bytes=torch.cuda.max_memory_allocated() if cuda else None)
    return row


def _child(cmd: list[str], env: dict, limit: float) -> tuple[dict | None, float]:
    """Run one configuration; stop it if its RSS passes ``limit`` bytes. (row or None, highest RSS seen)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)  # its stderr (progress) passes on
    highest = [0.0]

    def watch():
        while proc.poll() is None:
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                return
            rss = next((int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmRSS")), 0)
            highest[0] = max(highest[0], rss)
            if rss > limit:
                proc.kill()
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    out, _ = proc.communicate()
    watcher.join()
    if proc.returncode != 0:
        return None, highest[0]
    return json.loads(out.strip().splitlines()[-1]), highest[0]


def table(rows: list[dict], args) -> str:
    gib = 2 ** 30
    weights = next(r["weights_bytes"] for r in rows if r.get("weights_bytes"))
    peak_name = "peak CUDA" if args.device == "cuda" else "peak RSS"
    lines = [f"HyperLoRA Refine, {args.size} SDXL UNet ({weights / gib:.2f} GiB of weights), {args.resolution}² px, "
             f"batch 1, {args.device}, {args.threads} threads, {args.steps} steps (first not timed)",
             f"{'mode':<14}{'ckpt':<6}{'s/step':>9}{'÷ no-ckpt':>11}{'saved for bwd':>15}{'÷ no-ckpt':>11}"
             f"{peak_name:>12}{'peak − weights':>16}"]
    for r in rows:
        base = next((b for b in rows if b["mode"] == r["mode"] and not b["checkpointing"] and "step_s" in b), None)
        if "step_s" not in r:
            lines.append(f"{r['mode']:<14}{'on' if r['checkpointing'] else 'off':<6}{'stopped: RSS passed':>35} "
                         f"{r['limit'] / gib:.1f} GiB (highest seen {r['highest'] / gib:.2f} GiB)")
            continue
        peak = r["peak_cuda_bytes"] if args.device == "cuda" else r["peak_rss_bytes"]
        ratio = {k: f"{r[k] / base[k]:>10.2f}×" if base else f"{'—':>11}" for k in ("step_s", "saved_bytes")}
        lines.append(f"{r['mode']:<14}{'on' if r['checkpointing'] else 'off':<6}{r['step_s']:>9.2f}{ratio['step_s']}"
                     f"{r['saved_bytes'] / gib:>11.3f} GiB{ratio['saved_bytes']}{peak / gib:>8.2f} GiB"
                     f"{(peak - weights) / gib:>12.2f} GiB")
    lines.append("peak: " + ("torch.cuda.max_memory_allocated" if args.device == "cuda" else
                             "the process's max RSS (interpreter, ComfyUI, UNet and basis pages included)"))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="default: 64 (tiny), 1024 (full)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-limit-gib", type=float, default=16.0)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.comfyui:
        parser.error("set COMFYUI_PATH (or --comfyui) to a ComfyUI v0.3.64 checkout")
    args.resolution = args.resolution or (64 if args.size == "tiny" else 1024)
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="hl_refine_bench_")
    if args.one:
        sys.stdout.write(json.dumps(one(args)) + "\n")
        return
    if args.size == "full":
        sys.path.insert(0, str(ROOT))
        write_full_checkpoint(Path(args.workdir) / "ckpt_full")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    rows = []
    for mode, ckpt in CONFIGS:
        cmd = [sys.executable, __file__, "--comfyui", args.comfyui, "--size", args.size, "--device", args.device,
               "--resolution", str(args.resolution), "--steps", str(args.steps), "--threads", str(args.threads),
               "--workdir", args.workdir, "--one", f"{mode}:{'ckpt' if ckpt else 'nockpt'}"]
        limit = args.rss_limit_gib * 2 ** 30
        row, highest = _child(cmd, env, limit)
        rows.append(row or {"mode": mode, "checkpointing": ckpt, "limit": limit, "highest": highest})
        sys.stderr.write(f"done: {mode} checkpointing={ckpt}: {json.dumps(rows[-1])}\n")
    text = table(rows, args)
    sys.stdout.write(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
