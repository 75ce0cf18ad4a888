"""ComfyUI as a library for HyperLoRA training: the base-model backend of ``python -m hyperlora_core.train``.

Kept out of ``hyperlora_core`` (which never imports a host); the trainer reaches it only when a run's config
says ``data.backend = "comfy"``.
"""
