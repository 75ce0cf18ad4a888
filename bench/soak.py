"""Soak: many prompts through /prompt on the real ComfyUI server, on the host tier's tiny models.

    python bench/soak.py [--prompts 500] [--json soak.json]

ComfyUI is ``COMFYUI_PATH`` or the pinned v0.3.64 tree unpacked (tests/comfyui_checkout.py). The server runs on the
CPU over a throw-away root built like the host tier's (tests/host/conftest.py ``build_root``: tiny HyperLoRA
checkpoints, a tiny CLIP, antelopev2 doubles, the test node pack). Prompts are a fixed mix, in blocks of ten:

    plain        no identity (the baseline every ratio is taken to)
    new_photo    a photo never seen: face analysis, prediction, mixing, sampling
    same_photo   a photo seen before: the face analysis comes from the cache
    strength     the same identity applied at 0.5 / 0.85 / 1.2
    hook         the identity as a hook on the positive prompt for the first half of the steps
    slider       a Concept Slider between two identities, applied to the model
    save         the identity saved as an identity file and as a LoRA
    load         the last saved identity loaded and applied
    bad          every tenth prompt: one of a rotation of bad inputs; it must fail with our error

Every prompt samples (a new seed each time). It prints the server's RSS every 50 prompts, the latency by kind
(p50 / p95, with each p50's ratio to the plain prompt's), the final queue, and any temporary file left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for extra in (ROOT / "tests", ROOT / "tests" / "host", ROOT):  # the host tier's helpers, then the package
    if str(extra) not in sys.path:
        sys.path.insert(0, str(extra))

from graphs import FROM_IMAGE, Graph, apply, conditioning, decode_and_save, generation, identity, sample, tiny_model  # noqa: E402

SCHEDULE = ("plain", "new_photo", "same_photo", "strength", "hook", "save", "load", "slider", "same_photo")
SEEN_PHOTOS = (1, 2, 3, 4)  # image seeds of the photos "same_photo" comes back to
STRENGTHS = (0.5, 0.85, 1.2)
RSS_EVERY = int(os.environ.get("HYPERLORA_SOAK_RSS_EVERY", "50"))
WINDOW = len(SCHEDULE) + 1  # prompts in which every kind, and one bad prompt, runs once
OUR_ERRORS = ("hyperlora_core.errors.",)  # module path of the exception types our nodes raise
# files other libraries keep in TMPDIR by design, one each, never growing: name -> who writes it
FOREIGN_TEMP = {".ses": "onnxruntime's telemetry session record, written when its first InferenceSession starts"}


# -- prompts ------------------------------------------------------------------------------------------------------
def with_identity(i: int, image_seed: int, strength: float = 0.85) -> dict:
    g = generation(prefix="soak/gen", seed=i, image_seed=image_seed)
    g.nodes["apply"]["inputs"]["id_strength"] = strength
    return g.prompt()


def hooked(i: int) -> dict:
    g = Graph()
    hl, ident = identity(g, image_seed=SEEN_PHOTOS[0])
    hooks = g.add("hook", "HyperLoRAHook", hyper_lora=hl, identity=ident, strength=0.85, start_percent=0.0,
                  end_percent=0.5)
    positive, negative = conditioning(g)
    props = g.add("props", "ConditioningSetProperties", cond_NEW=positive, strength=1.0, set_cond_area="default",
                  hooks=g.out(hooks))
    decode_and_save(g, sample(g, tiny_model(g), g.out(props), negative, seed=i), "soak/hook")
    return g.prompt()


def slider(i: int) -> dict:
    g = Graph()
    hl, start = identity(g, image_seed=SEEN_PHOTOS[0])
    end = g.add("end_photo", "HLTestFaceImage", seed=SEEN_PHOTOS[1], face=True)
    moved = g.add("slider", "ConceptSlider", hyper_lora=hl, mode="weight", strength=(-1.0, 1.0)[i % 2],
                  start_identity=start, end_image=g.out(end), model=tiny_model(g))
    positive, negative = conditioning(g)
    decode_and_save(g, sample(g, g.out(moved), positive, negative, seed=i), "soak/slider")
    return g.prompt()


def save(i: int) -> dict:
    g = Graph()
    hl, ident = identity(g, image_seed=SEEN_PHOTOS[i % len(SEEN_PHOTOS)])
    g.add("save_identity", "SaveHyperLoRAIdentity", identity=ident, filename_prefix="soak_id", storage="fp16")
    g.add("save_lora", "SaveHyperLoRA", hyper_lora=hl, identity=ident, filename_prefix="soak/lora")
    positive, negative = conditioning(g)
    decode_and_save(g, sample(g, apply(g, tiny_model(g), hl, ident), positive, negative, seed=i), "soak/save")
    return g.prompt()


def load(i: int, name: str) -> dict:
    g = Graph()
    hl = g.add("load", "LoadHyperLoRA", checkpoint="tiny_a", face_analyzer="models/antelopev2", provider="cpu",
               dtype="fp32")
    ident = g.add("load_identity", "LoadHyperLoRAIdentity", identity=name)
    positive, negative = conditioning(g)
    model = apply(g, tiny_model(g), g.out(hl), g.out(ident))
    decode_and_save(g, sample(g, model, positive, negative, seed=i), "soak/load")
    return g.prompt()


def bad(i: int) -> tuple[str, dict]:
    """One of a rotation of bad inputs (each refused by our code before sampling)."""
    kind = BAD[(i // 10) % len(BAD)]
    if kind == "no_face":
        g = generation(prefix="soak/bad", seed=i)
        g.nodes["photo"]["inputs"]["face"] = False
    elif kind == "nan_strength":
        g = generation(prefix="soak/bad", seed=i)
        g.nodes["apply"]["inputs"]["id_strength"] = float("nan")
    elif kind == "sd15_model":
        g = generation(prefix="soak/bad", seed=i)
        g.nodes["model"] = {"class_type": "HLTestTinySD15", "inputs": {"seed": 0}}
    elif kind == "escaping_prefix":
        g = Graph()
        _, ident = identity(g, image_seed=SEEN_PHOTOS[0])
        g.add("save_identity", "SaveHyperLoRAIdentity", identity=ident, filename_prefix="../../soak_escape",
              storage="fp16")
    elif kind == "hook_range":
        g = Graph()
        hl, ident = identity(g, image_seed=SEEN_PHOTOS[0])
        hooks = g.add("hook", "HyperLoRAHook", hyper_lora=hl, identity=ident, strength=0.85, start_percent=0.9,
                      end_percent=0.1)
        positive, negative = conditioning(g)
        props = g.add("props", "ConditioningSetProperties", cond_NEW=positive, strength=1.0,
                      set_cond_area="default", hooks=g.out(hooks))
        decode_and_save(g, sample(g, tiny_model(g), g.out(props), negative, seed=i), "soak/bad")
    else:  # nan_pixels
        g = Graph()
        hl = g.add("load", "LoadHyperLoRA", checkpoint="tiny_a", face_analyzer="models/antelopev2", provider="cpu",
                   dtype="fp32")
        image = g.add("bad_image", "HLTestBadImage", kind="nan")
        ident = g.add("from_image", "HyperLoRAFromImage", hyper_lora=g.out(hl), image=g.out(image), **FROM_IMAGE)
        g.add("save_identity", "SaveHyperLoRAIdentity", identity=g.out(ident), filename_prefix="soak_bad",
              storage="fp16")
    return kind, g.prompt()


BAD = ("no_face", "nan_strength", "sd15_model", "escaping_prefix", "hook_range", "nan_pixels")


# -- the run ------------------------------------------------------------------------------------------------------
@dataclass
class Record:
    index: int  # 1-based prompt number
    kind: str  # schedule kind ("bad" for the bad ones)
    detail: str  # bad-input name, strength, image seed ...
    seconds: float  # POST /prompt to the end of the prompt
    status: str | None  # /history status_str
    ours: bool  # for a failed prompt: raised by this package with one of our error types
    message: str = ""  # the error text, for failures


@dataclass
class SoakResult:
    records: list[Record] = field(default_factory=list)
    rss: dict[int, int] = field(default_factory=dict)  # prompts done -> server RSS in bytes
    anon: dict[int, int] = field(default_factory=dict)  # prompts done -> its anonymous part (what leaks grow)
    trace: dict[int, int] = field(default_factory=dict)  # every prompt done -> anonymous RSS, for window peaks
    queue: dict = field(default_factory=dict)  # /queue at the end: running and pending counts
    temp_files: list[str] = field(default_factory=list)  # temporary files left in the server's TMPDIR or saves
    foreign_temp: list[str] = field(default_factory=list)  # FOREIGN_TEMP files found in the server's TMPDIR

    def window_peak(self, end: int, size: int = WINDOW) -> int:
        """The highest anonymous RSS over the ``size`` prompts ending at ``end``.

        One window holds each prompt kind once, so a transient that one kind keeps until the next prompt (a
        reloaded network, a cached node output) is in every window, and only growth from window to window is a
        leak. A single reading after a given prompt swings by ~170 MiB with the kind that ran last.
        """
        return max(v for i, v in self.trace.items() if end - size < i <= end)

    def failures(self) -> list[Record]:
        """Good prompts that failed, and bad ones that did not fail with our error."""
        return [r for r in self.records if (r.kind == "bad") != (r.status == "error" and r.ours)
                or (r.kind != "bad" and r.status != "success")]


def prompt_for(i: int, saved: list[str]) -> tuple[str, str, dict]:
    if i % 10 == 0:
        name, prompt = bad(i)
        return "bad", name, prompt
    kind = SCHEDULE[(i % 10) - 1]
    if kind == "load" and not saved:
        kind = "save"
    if kind == "plain":
        return kind, "", generation(prefix="soak/plain", seed=i, with_identity=False).prompt()
    if kind == "new_photo":
        return kind, f"photo {100 + i}", with_identity(i, 100 + i)
    if kind == "same_photo":
        seed = SEEN_PHOTOS[(i // 10) % len(SEEN_PHOTOS)]
        return kind, f"photo {seed}", with_identity(i, seed)
    if kind == "strength":
        strength = STRENGTHS[(i // 10) % len(STRENGTHS)]
        return kind, f"{strength}", with_identity(i, SEEN_PHOTOS[0], strength)
    if kind == "hook":
        return kind, "", hooked(i)
    if kind == "slider":
        return kind, "", slider(i)
    if kind == "save":
        return kind, "", save(i)
    return kind, saved[-1], load(i, saved[-1])


def newest_identity(identity_folders: list[Path], after: float) -> str | None:
    files = [(p.stat().st_mtime, p.name) for f in identity_folders for p in f.glob("soak_id_*.safetensors")
             if p.stat().st_mtime >= after]
    return max(files)[1] if files else None


def leftovers(server, root: Path) -> tuple[list[str], list[str]]:
    """(files left in the server's own TMPDIR and half-written saves anywhere under the root, FOREIGN_TEMP files)."""
    in_tmp = [p for p in server.tmp.rglob("*") if p.is_file()]
    found = [str(p) for p in in_tmp if p.name not in FOREIGN_TEMP] + [str(p) for p in root.rglob(".*.tmp")]
    return sorted(found), sorted(str(p) for p in in_tmp if p.name in FOREIGN_TEMP)


def soak(server, root: Path, prompts: int, identity_folders: list[Path], log=None, progress=None) -> SoakResult:
    """Queue ``prompts`` prompts one after another on a running ComfyServer; measure as described above.

    ``log`` receives the RSS lines, ``progress`` one line per prompt."""
    result, saved = SoakResult(), []
    for i in range(1, prompts + 1):
        kind, detail, prompt = prompt_for(i, saved)
        started_wall, started = time.time(), time.perf_counter()
        run = server.run(prompt, timeout=300)
        seconds = time.perf_counter() - started
        error = run.error or {}
        ours = run.raised_by_us and error.get("exception_type", "").split("ComfyUI-HyperLoRA.")[-1].startswith(
            OUR_ERRORS)
        message = error.get("exception_message", "") if run.status != "success" else ""
        if run.http_status != 200:
            message = json.dumps(run.response)[:300]
        result.records.append(Record(i, kind, detail, seconds, run.status, bool(ours), message))
        if progress:
            progress(f"#{i} {kind} {detail}: {run.status} in {seconds:.1f} s {message[:120]}")
        if kind == "save" and run.status == "success":
            name = newest_identity(identity_folders, started_wall - 1)
            if name:
                saved.append(name)
        result.trace[i] = server.anon_rss()
        if i % RSS_EVERY == 0 or i == prompts:
            result.rss[i], result.anon[i] = server.rss(), server.anon_rss()
            if log:
                log(f"prompt {i}: server RSS {result.rss[i] / 2**20:.1f} MiB, "
                    f"anonymous {result.anon[i] / 2**20:.1f} MiB")
    queue = server.get_json("/queue")
    result.queue = {"running": len(queue["queue_running"]), "pending": len(queue["queue_pending"])}
    result.temp_files, result.foreign_temp = leftovers(server, root)
    return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def latency_table(result: SoakResult) -> list[tuple[str, int, int, float, float, float]]:
    """(kind, prompts, as expected, p50 s, p95 s, p50 / plain p50) by kind, in schedule order."""
    by_kind: dict[str, list[Record]] = {}
    for r in result.records:
        by_kind.setdefault(r.kind, []).append(r)
    wrong = {id(r) for r in result.failures()}
    plain = percentile([r.seconds for r in by_kind.get("plain", result.records)], 0.5)
    rows = []
    for kind in dict.fromkeys((*SCHEDULE, "bad")):
        records = by_kind.get(kind, [])
        if records:
            times = [r.seconds for r in records]
            p50 = percentile(times, 0.5)
            rows.append((kind, len(records), sum(id(r) not in wrong for r in records), p50, percentile(times, 0.95),
                         p50 / plain))
    return rows


def report(result: SoakResult) -> str:
    lines = ["| kind | prompts | as expected | p50 (s) | p95 (s) | p50 / plain p50 |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {k} | {n} | {ok} | {p50:.2f} | {p95:.2f} | {ratio:.2f}x |"
              for k, n, ok, p50, p95, ratio in latency_table(result)]
    first = min(result.rss)
    lines += ["", f"| after prompt | server RSS (MiB) | vs. after prompt {first} | anonymous (MiB) | vs. after prompt "
              f"{first} |", "|---:|---:|---:|---:|---:|"]
    for n, b in sorted(result.rss.items()):
        anon = result.anon.get(n)
        tail = f"{anon / 2**20:.1f} | {anon / result.anon[first]:.3f}x |" if anon else "- | - |"
        lines.append(f"| {n} | {b / 2**20:.1f} | {b / result.rss[first]:.3f}x | {tail}")
    lines += ["", f"queue at the end: {result.queue['running']} running, {result.queue['pending']} pending; "
              f"temporary files left: {len(result.temp_files)} (besides {len(result.foreign_temp)} of "
              f"{', '.join(FOREIGN_TEMP)}: {'; '.join(FOREIGN_TEMP.values())}); "
              f"prompts not as expected: {len(result.failures())}"]
    lines += [f"  #{r.index} {r.kind} {r.detail}: {r.status} {r.message[:200]}" for r in result.failures()[:10]]
    return "\n".join(lines)


def from_json(path: Path) -> SoakResult:
    """A result written by --json (temporary files re-sorted into ours and FOREIGN_TEMP by name)."""
    data = json.loads(path.read_text())
    files = data["temp_files"] + data.get("foreign_temp", [])
    return SoakResult(records=[Record(**r) for r in data["records"]], rss={int(k): v for k, v in data["rss"].items()},
                      anon={int(k): v for k, v in data.get("anon", {}).items()},
                      queue=data["queue"], temp_files=[f for f in files if Path(f).name not in FOREIGN_TEMP],
                      foreign_temp=[f for f in files if Path(f).name in FOREIGN_TEMP])


def tiny_clip(folder: Path) -> Path:
    """The HF-format CLIP double the host tier uses (tests/conftest.py tiny_clip_folder), written by transformers."""
    import torch
    import transformers

    from helpers import TINY_CLIP_WIDTH

    config = transformers.CLIPVisionConfig(hidden_size=TINY_CLIP_WIDTH, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=2, image_size=224, patch_size=14,
                                           hidden_act="quick_gelu")
    torch.manual_seed(0)
    transformers.CLIPVisionModel(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=500)
    parser.add_argument("--json", type=Path, help="also write every record here")
    parser.add_argument("--verbose", action="store_true", help="one line per prompt on stderr")
    parser.add_argument("--report", type=Path, help="only print the tables of an earlier --json run")
    args = parser.parse_args()
    if args.report:
        print(report(from_json(args.report)))
        return
    import importlib.util

    from comfy_server import ComfyServer

    from comfyui_checkout import ensure_comfyui

    spec = importlib.util.spec_from_file_location("host_conftest", ROOT / "tests" / "host" / "conftest.py")
    host = sys.modules["host_conftest"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(host)  # build_root: the host tier's throw-away ComfyUI root

    comfyui = ensure_comfyui()
    if comfyui is None:
        sys.exit("no ComfyUI: set COMFYUI_PATH or put the pinned tarball in ../shared/host/")
    with tempfile.TemporaryDirectory(prefix="hyperlora-soak-") as work:
        root = host.build_root(Path(work) / "root", tiny_clip(Path(work) / "clip"))
        server = ComfyServer(Path(comfyui), root).start()
        try:
            started = time.perf_counter()
            result = soak(server, root, args.prompts, [root / "models" / "hyper_lora" / "identities"],
                          log=lambda text: print(text, flush=True),
                          progress=(lambda text: print(text, file=sys.stderr, flush=True)) if args.verbose else None)
            minutes = (time.perf_counter() - started) / 60
        finally:
            server.stop()
    print(f"{args.prompts} prompts in {minutes:.1f} min on ComfyUI {Path(comfyui).name} (CPU)\n")
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps({"records": [asdict(r) for r in result.records], "rss": result.rss,
                                         "anon": result.anon,
                                         "queue": result.queue, "temp_files": result.temp_files,
                                         "foreign_temp": result.foreign_temp}, indent=1))


if __name__ == "__main__":
    main()
