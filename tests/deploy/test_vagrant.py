"""vagrant/: `vagrant validate` accepts the Vagrantfile (Debian's vagrant
package, which scripts/setup.sh installs on Debian), and the provisioning
script it runs is the one the issue asks for: setup.sh, doctor, demo."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from tests.deploy.conftest import ROOT, require_tool

VAGRANT = ROOT / "vagrant"
PROVISION = VAGRANT / "provision.sh"


def validate(vagrant_dir: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    tool = require_tool("vagrant", "vagrant")
    env = dict(os.environ, VAGRANT_CWD=str(vagrant_dir),
               # keep ~/.vagrant.d and vagrant/.vagrant out of the checkout and home
               VAGRANT_HOME=str(tmp_path / "home"), VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
               VAGRANT_CHECKPOINT_DISABLE="1", VAGRANT_NO_COLOR="1")
    # --ignore-provider: no VirtualBox/libvirt here, only the config is checked
    return subprocess.run([tool, "validate", "--ignore-provider"], env=env,
                          capture_output=True, text=True, timeout=60)


def test_vagrant_validate(tmp_path: Path) -> None:
    result = validate(VAGRANT, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout
    assert not (VAGRANT / ".vagrant").exists()


def test_vagrant_validate_has_teeth(tmp_path: Path) -> None:
    """A provisioning script that is not there fails validation."""
    broken = tmp_path / "vagrant"
    broken.mkdir()
    (broken / "Vagrantfile").write_text(
        (VAGRANT / "Vagrantfile").read_text().replace('path: "provision.sh"', 'path: "gone.sh"'))
    result = validate(broken, tmp_path)
    assert result.returncode != 0
    assert "gone.sh" in result.stdout + result.stderr


def test_box_is_a_pinned_ubuntu_24_04() -> None:
    text = (VAGRANT / "Vagrantfile").read_text()
    assert re.search(r'^\s*config\.vm\.box = "bento/ubuntu-24\.04"$', text, re.M)
    assert re.search(r'^\s*config\.vm\.box_version = "\d+\.\d+\.\d+"', text, re.M)
    assert re.search(r'^\s*config\.vm\.provision .*path: "provision\.sh"', text, re.M)


def test_provisioning_runs_setup_then_doctor_then_demo() -> None:
    subprocess.run(["bash", "-n", str(PROVISION)], check=True, timeout=10)
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "setup.sh")], check=True, timeout=10)
    commands = [line.strip() for line in PROVISION.read_text().splitlines()
                if line.strip() and not line.lstrip().startswith(("#", "echo"))]
    assert "set -euo pipefail" in commands  # a failing step fails `vagrant up`
    steps = [c for c in commands if re.search(r"setup\.sh|leaktap (doctor|demo)", c)]
    assert steps == ["bash scripts/setup.sh", ".venv/bin/leaktap doctor",
                     ".venv/bin/leaktap demo"]
    # the same script `make run` starts with
    assert re.search(r"^setup:\n\t.*bash scripts/setup\.sh$", (ROOT / "Makefile").read_text(),
                     re.M)
    assert re.search(r"^run: setup$", (ROOT / "Makefile").read_text(), re.M)

