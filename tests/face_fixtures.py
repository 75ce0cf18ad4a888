"""Module-scoped fixtures over the antelopev2 doubles (tests/face_doubles.py), one definition for every face test.

A test module binds the ones it uses by name, so pytest finds them there::

    import face_fixtures

    antelope, analyzer = face_fixtures.antelope, face_fixtures.analyzer
"""

from __future__ import annotations

import pytest

from face_doubles import write_antelopev2


@pytest.fixture(scope="module")
def antelope(tmp_path_factory):
    """An antelopev2 folder holding the five doubles, written once per test module."""
    return write_antelopev2(tmp_path_factory.mktemp("insightface") / "antelopev2")


@pytest.fixture(scope="module")
def analyzer(antelope):
    """A FaceAnalyzer on that folder, on the CPU."""
    from hyperlora_core.face import FaceAnalyzer

    return FaceAnalyzer(antelope, providers="cpu")
