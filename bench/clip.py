"""Benchmark of the CLIP ViT-L/14 penultimate tokens: the core's encoder (open_clip's tower) against transformers.

    python bench/clip.py [--threads 2] [--batch 1 4] [--repeat 5] [--device cpu] [--dtype fp32]

Full-size random weights (24 blocks, width 1024, QuickGELU) are written once as an HF folder; the same weights
run through ``hyperlora_core.clip.ClipVisionEncoder`` (open_clip's ``VisionTransformer``, 23 blocks) and
transformers' ``CLIPVisionModel`` (``hidden_states[-2]``; it runs all 24 blocks). Each line prints the median time,
its ratio to transformers' and the largest difference of the tokens from transformers'.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

VIT_L = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
             image_size=224, patch_size=14, hidden_act="quick_gelu")


def median_time(fn, repeat: int, sync) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    import transformers

    from hyperlora_core.clip import _DTYPES, ClipVisionEncoder

    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), _DTYPES[args.dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VIT_L)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp, safe_serialization=True)
        encoder = ClipVisionEncoder.from_folder(tmp, device=device, dtype=dtype)
    hf = hf.to(device=device, dtype=dtype)
    print(f"CLIP ViT-L/14 penultimate tokens, {args.device} {args.dtype}, {args.threads} threads, "
          f"median of {args.repeat}; torch {torch.__version__}, transformers {transformers.__version__}")
    for batch in args.batch:
        pixels = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        pixels = pixels.to(device=device, dtype=dtype)

        def reference(x):
            with torch.no_grad():
                return hf(pixel_values=x, output_hidden_states=True).hidden_states[-2]

        expected = reference(pixels).float()
        rows = [("transformers", reference), ("ours", encoder.encode)]
        base = None
        print(f"batch {batch}:")
        for name, fn in rows:
            seconds = median_time(lambda f=fn, x=pixels: f(x), args.repeat, sync)
            base = base or seconds
            diff = (fn(pixels).float() - expected).abs().max().item()
            print(f"  {name:<13} {seconds * 1e3:8.1f} ms   {seconds / base:5.2f}× transformers   "
                  f"max |tokens - transformers| {diff:.3g}")


if __name__ == "__main__":
    main()
