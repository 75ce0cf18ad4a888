"""Thin ComfyUI V3 adapters over ``hyperlora_core``, one module per concern.

The node list is filled by the node issues (#4 onward); this module only defines the extension object.
"""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class HyperLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return []
