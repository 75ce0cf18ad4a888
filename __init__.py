"""ComfyUI entry point of HyperLoRA for ComfyUI (V3 node API).

ComfyUI imports this package from ``custom_nodes/``; ``comfy_entrypoint`` hands it the extension whose nodes
live in ``nodes/``. The engine itself is ``hyperlora_core`` and never imports ComfyUI.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    from .nodes import HyperLoRAExtension
    from .nodes.folders import register

    register()
    return HyperLoRAExtension()
