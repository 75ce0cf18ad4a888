"""What a new user reads: where to download each model (README, the loader's help page, every example's Note,
the doctor's fixes) and the doctor command as it works from ComfyUI's folder (issue 16, points 6 and 7)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hyperlora_core.doctor import COMMAND, run_doctor
from hyperlora_core.sources import ANTELOPEV2, SOURCES

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"README.md": ROOT / "README.md", "help page": ROOT / "web" / "docs" / "LoadHyperLoRA.md"}
EXAMPLES = sorted((ROOT / "example_workflows").glob("*.json"))
OLD_DOCTOR = "python -m hyperlora_core doctor --models ComfyUI/models"  # did not run from ComfyUI's folder


def origin_names(origin: str) -> list[str]:
    """The names a user searches for: the repositories and the zip named in a source."""
    return [w.strip(",;()") for w in origin.split() if "/" in w or w.endswith(".zip")]


@pytest.mark.parametrize("page", sorted(PAGES))
def test_pages_name_every_download_with_files_and_sizes(page):
    text = " ".join(PAGES[page].read_text().split())  # line breaks as spaces
    for source in SOURCES:
        for name in origin_names(source.origin):
            assert name in text, f"{page}: the source {name!r} of {source.what} is not named"
        for file, size in source.files:
            assert f"`{file}` ({size.split(',')[0]})" in text, f"{page}: {file} without its size {size}"


@pytest.mark.parametrize("example", [p.name for p in EXAMPLES])
def test_every_example_note_says_where_to_download(example):
    graph = json.loads((ROOT / "example_workflows" / example).read_text())
    notes = "\n".join(n["widgets_values"][0] for n in graph["nodes"] if n["type"] == "Note")
    if not any(n["type"] == "LoadHyperLoRA" for n in graph["nodes"]):  # HyperDreamBooth: only the face analyzer
        assert ANTELOPEV2.line() in notes and "models/hyperdreambooth" in notes, example
        return
    for source in SOURCES:
        assert source.line() in notes, f"{example}: the Note lacks {source.what}"
    assert COMMAND in notes and OLD_DOCTOR not in notes


def test_the_doctors_fixes_name_the_sources(tmp_path):
    (tmp_path / "models").mkdir()
    fixes = " ".join(c.fix for c in run_doctor(tmp_path / "models", packages=False))
    for source in SOURCES:
        assert source.origin.split(",")[0].split(" (")[0] in fixes, (source.what, fixes)


@pytest.mark.parametrize("page", [*sorted(PAGES), "example_workflows/README.md"])
def test_the_doctor_command_is_the_one_that_runs(page):
    text = PAGES.get(page, ROOT / page).read_text() if page in PAGES else (ROOT / page).read_text()
    assert OLD_DOCTOR not in text
    if page in PAGES:
        assert COMMAND in text
