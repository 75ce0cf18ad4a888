"""Counts by tier at the end of a run, and the CI rules on them (a pytest plugin, loaded by tests/conftest.py).

Tiers by path: ``tests/host/test_browser.py`` is the browser tier, the rest of ``tests/host`` the host tier,
everything else tier 1. Under ``CI=true`` (or ``HYPERLORA_STRICT_TIERS=1``) the run fails when a test was skipped
that is not marked ``gpu``, or when the host tier passed fewer than ``MIN_HOST`` tests or the browser tier none.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest

MIN_HOST = 80
TIERS = ("tier 1", "host", "browser")


def tier_of(nodeid: str) -> str:
    path = nodeid.split("::", 1)[0].replace("\\", "/")
    if path.endswith("host/test_browser.py"):
        return "browser"
    return "host" if "/host/" in f"/{path}" else "tier 1"


def strict() -> bool:
    return os.environ.get("CI", "").lower() == "true" or os.environ.get("HYPERLORA_STRICT_TIERS") == "1"


class TierCounter:
    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {t: Counter() for t in TIERS}
        self.bad_skips: list[str] = []
        self.gpu: set[str] = set()

    @pytest.hookimpl
    def pytest_collection_modifyitems(self, items) -> None:
        self.gpu = {item.nodeid for item in items if item.get_closest_marker("gpu")}

    @pytest.hookimpl
    def pytest_runtest_logreport(self, report) -> None:
        tier = self.counts[tier_of(report.nodeid)]
        if report.when == "call" and report.passed:
            tier["passed"] += 1
        elif report.failed:
            tier["failed"] += 1
        elif report.skipped:
            tier["skipped"] += 1
            if report.nodeid not in self.gpu:
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
                self.bad_skips.append(f"{report.nodeid}: {reason}")

    def problems(self) -> list[str]:
        if not strict():
            return []
        found = [f"skipped outside the GPU-only tests: {s}" for s in self.bad_skips]
        if self.counts["host"]["passed"] < MIN_HOST:
            found.append(f"the host tier passed {self.counts['host']['passed']} tests; CI needs at least {MIN_HOST}")
        if self.counts["browser"]["passed"] == 0:
            found.append("the browser tier passed no test")
        return found

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session, exitstatus) -> None:
        if self.problems() and session.exitstatus == 0:
            session.exitstatus = 1

    @pytest.hookimpl
    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.section("tests by tier")
        for name in TIERS:
            c = self.counts[name]
            terminalreporter.write_line(f"{name}: {c['passed']} passed, {c['failed']} failed, {c['skipped']} skipped")
        for line in self.problems():
            terminalreporter.write_line(f"CI RULE BROKEN: {line}", red=True)
