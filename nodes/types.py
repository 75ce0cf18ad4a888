"""Custom wire types of the pack."""

from comfy_api.latest import io

HyperLoRAType = io.Custom("HYPER_LORA")  # nodes.handle.HyperLoRAHandle
IdentityType = io.Custom("HYPER_LORA_IDENTITY")  # hyperlora_core.Identity
LidbType = io.Custom("LIDB")  # hyperlora_core.lidb.LiDB
HdbType = io.Custom("HYPER_DREAMBOOTH")  # nodes.hyperdreambooth.HdbHandle
CATEGORY = "HyperLoRA"
