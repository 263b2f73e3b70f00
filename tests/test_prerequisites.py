"""A missing prerequisite skips a test outside CI and fails it under CI=true."""

from __future__ import annotations

import pytest

from tests.prerequisites import missing


def test_missing_prerequisite_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")

    with pytest.raises(pytest.fail.Exception, match="no cgroup2 mount; under CI=true"):
        missing("no cgroup2 mount")


def test_missing_prerequisite_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)

    with pytest.raises(pytest.skip.Exception, match="no cgroup2 mount"):
        missing("no cgroup2 mount")
