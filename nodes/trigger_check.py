"""Server-side trigger-word check for prompts queued over the API (the browser guard only helps UI users).

When a prompt applies an identity (Apply HyperLoRA or an Identity Hook) and no text encoder in the graph was given
the trigger words, the identity does nothing: one warning per prompt says so in the server log. A text fed from
another node cannot be read at queue time; then one line says the check could not be made.
"""

from __future__ import annotations

import logging

from ..hyperlora_core.config import TRIGGER_WORDS

log = logging.getLogger(__name__)

IDENTITY_NODES = ("ApplyHyperLoRA", "HyperLoRAHook")
TEXT_INPUTS = ("text", "text_g", "text_l", "prompt")


def prompt_texts(prompt: dict) -> tuple[list[str], list[str]]:
    """(literal prompt texts, ids of text encoders whose text comes through a link) of an API-format prompt."""
    texts, linked = [], []
    for node_id, node in prompt.items():
        if not isinstance(node, dict) or "TextEncode" not in str(node.get("class_type", "")):
            continue
        for name in TEXT_INPUTS:
            value = node.get("inputs", {}).get(name)
            if isinstance(value, str):
                texts.append(value)
            elif isinstance(value, list):
                linked.append(str(node_id))
    return texts, linked


def trigger_problem(prompt: dict) -> str | None:
    """The warning for ``prompt`` (API format), or None when there is nothing to say."""
    if not isinstance(prompt, dict):
        return None
    applied = sorted({str(n.get("class_type")) for n in prompt.values()
                      if isinstance(n, dict) and n.get("class_type") in IDENTITY_NODES})
    if not applied:
        return None
    texts, linked = prompt_texts(prompt)
    if any(TRIGGER_WORDS in text for text in texts):
        return None
    if linked:
        return (f"HyperLoRA: this prompt applies an identity ({', '.join(applied)}) and its prompt text comes from "
                f"other nodes (text encoder node {', '.join(linked)}), so the trigger words '{TRIGGER_WORDS}' could "
                "not be checked. Make sure that text contains them, or the identity has no effect.")
    return (f"HyperLoRA: this prompt applies an identity ({', '.join(applied)}) but no text encoder in it was given "
            f"the trigger words '{TRIGGER_WORDS}': the identity will have no effect. Put them in the positive "
            "prompt (Apply HyperLoRA's trigger_words output holds them).")


def on_prompt(json_data: dict) -> dict:
    """PromptServer on-prompt handler: log at most one line per queued prompt; never changes the prompt."""
    problem = trigger_problem(json_data.get("prompt") if isinstance(json_data, dict) else None)
    if problem:
        log.warning(problem)
    return json_data


def register() -> bool:
    """Hook ``on_prompt`` into the running server; False (said once) where there is no server to hook into."""
    try:
        from server import PromptServer
    except ImportError:
        log.info("HyperLoRA: no ComfyUI server here; API prompts are not checked for the trigger words")
        return False
    instance = getattr(PromptServer, "instance", None)
    if instance is None or not hasattr(instance, "add_on_prompt_handler"):
        log.info("HyperLoRA: this ComfyUI has no on-prompt hook; API prompts are not checked for the trigger words")
        return False
    if on_prompt not in getattr(instance, "on_prompt_handlers", []):
        instance.add_on_prompt_handler(on_prompt)
    return True
