"""Training a HyperLoRA (pure torch; the ComfyUI base-model backend lives in ``train_comfy``).

``config`` (one dataclass per component, read from TOML), ``hypernet`` (the trainable resampler, ID projector
and bases, built from the core's modules and mixed by the core's ``mix_bases``/``lora_pair``), ``denoiser`` (the
seam to a frozen base model), ``stages`` (the paper's three stages and the trigger-word cases), ``loop`` (the
trainer: accumulation, bf16 autocast, EMA, warm-up + cosine, checkpoints, exact resume, DDP / FSDP), ``export``
(the released folder format), ``prepare`` and ``shards`` (the data), ``validate``, ``toy`` (the tiny world of
the tests and benchmarks). Command line: ``python -m hyperlora_core.train run|export|prepare``.
"""
