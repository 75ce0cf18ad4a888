"""Verdicts on runs for the host tier's fault tests: whose error it was, whether its words are there, and whether a
good prompt still runs afterwards; and the small graph pieces those tests share."""

from __future__ import annotations

from graphs import ANALYZER, FROM_IMAGE, Graph, generation

GENERIC = {"AssertionError", "KeyError", "IndexError", "TypeError", "AttributeError", "RuntimeError",
           "ZeroDivisionError", "UnboundLocalError", "NameError"}
OUR_NODES = ("LoadHyperLoRA", "HyperLoRAFromImage", "ApplyHyperLoRA")


def explain(run) -> str:
    if run.error:
        return f"{run.error['node_type']}: {run.error['exception_type']}: {run.error['exception_message']}\n" + \
            "".join(run.error["traceback"][-3:])
    return f"HTTP {run.http_status}: {run.response} {[m['type'] for m in run.messages]}"


# -- graph pieces ------------------------------------------------------------------------------------------------
def loader(g: Graph, checkpoint: str = "tiny_a", tag: str = "", **extra) -> list:
    return g.out(g.add(f"load{tag}", "LoadHyperLoRA", checkpoint=checkpoint, face_analyzer=ANALYZER, provider="cpu",
                       dtype="fp32", **extra))


def from_image(g: Graph, hl: list, image: list, tag: str = "", face_index: int = -1, on_failure: str = "error"):
    node = g.add(f"from_image{tag}", "HyperLoRAFromImage", hyper_lora=hl, image=image,
                 **dict(FROM_IMAGE, face_index=face_index, on_failure=on_failure))
    g.add(f"preview{tag}", "PreviewImage", images=g.out(node, 1))
    return g.out(node)


def assert_ours(run, node_type: str | None, words) -> None:
    assert run.http_status == 200 and run.status == "error" and run.error, explain(run)
    error = run.error
    if node_type is not None:
        assert error["node_type"] == node_type, explain(run)
    else:
        assert error["node_type"] in OUR_NODES, explain(run)
    assert run.raised_by_us and error["exception_type"].split(".")[-1] not in GENERIC, explain(run)
    message = error["exception_message"].lower()
    missing = [w for w in words if w.lower() not in message]
    assert not missing, f"missing {missing} in: {explain(run)}"


def assert_good_prompt_runs(server, tag: str) -> None:
    """A good prompt right after the bad one: the server still generates (and really samples: a new seed)."""
    seed = 1000 + sum(map(ord, tag))
    run = server.server.run(generation(prefix=f"after_{tag}", seed=seed).prompt())
    assert run.status == "success" and "sampler" in run.executed, explain(run)




def forget(server, run) -> None:
    """Drop a bad prompt from /history: a NaN widget value there is valid for Python's json but not for the browser's
    JSON.parse, and would break the frontend of later tests on the shared server."""
    if run.prompt_id is not None:
        status, _ = server.server.post("/history", {"delete": [run.prompt_id]})
        assert status == 200
