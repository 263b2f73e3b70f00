"""The wheel carries every module and data file of the three top-level folders.

Subpackages are discovered by setup.py; this is what catches a folder that works in
development (editable install) and would silently vanish from a user's install.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOP_LEVEL = {"bpf": "leaktap/bpf", "controller": "leaktap/controller",
             "analytics": "leaktap/analytics"}
# Files that are not shipped on purpose: caches and editor leftovers only.
NOT_SHIPPED = ("__pycache__", ".pyc", ".swp", "~")


def _tracked_files(folder: str) -> list[str]:
    out = subprocess.run(["git", "ls-files", folder], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout.split()
    return [f for f in out if not f.endswith(NOT_SHIPPED) and (REPO / f).is_file()]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    # a copy of the tracked tree, so that the build leaves nothing in the checkout
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        if (REPO / f).is_file():
            (build / f).parent.mkdir(parents=True, exist_ok=True)
            (build / f).write_bytes((REPO / f).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(out), str(build)], check=True, capture_output=True)
    (wheel,) = out.glob("leaktap-*.whl")
    with zipfile.ZipFile(wheel) as z:
        return set(z.namelist())


@pytest.mark.parametrize("folder", sorted(TOP_LEVEL))
def test_every_tracked_file_of_a_top_level_folder_is_in_the_wheel(
        wheel_names: set[str], folder: str) -> None:
    tracked = _tracked_files(folder)
    assert len(tracked) > 5, f"{folder}/ looks empty: {tracked}"
    missing = [f for f in tracked
               if TOP_LEVEL[folder] + f[len(folder):] not in wheel_names]
    assert missing == [], f"not in the wheel: {missing}"


def test_nothing_named_controller_or_analytics_lands_at_the_top(wheel_names: set[str]) -> None:
    tops = {name.split("/", 1)[0] for name in wheel_names}
    assert tops <= {"leaktap"} | {t for t in tops if t.endswith((".dist-info", ".data"))}


def test_the_wheel_carries_the_compiled_fingerprint_prefilter(wheel_names: set[str]) -> None:
    # built from analytics/plaintext/_prefilter.c (issue 15.3); optional in setup.py, so
    # only this test notices a build that silently fell back to the numpy path
    built = [n for n in wheel_names
             if n.startswith("leaktap/analytics/plaintext/_prefilter.") and n.endswith(".so")]
    assert len(built) == 1, sorted(n for n in wheel_names if "_prefilter" in n)
