#!/usr/bin/env bash
# vagrant/ provisioning, run as root inside the VM on `vagrant up` (and on
# `vagrant provision`): the same setup as `make run` (scripts/setup.sh, which
# `make run` and `make test` call first), then `leaktap doctor` and `leaktap demo`.
# A failing step fails the provisioning: the doctor prints the fix.
set -euo pipefail

REPO=${REPO:-/leaktap}
cd "$REPO"

echo "== scripts/setup.sh"
bash scripts/setup.sh

echo "== leaktap doctor"
.venv/bin/leaktap doctor

echo "== leaktap demo"
# the dashboard is forwarded to the host's 127.0.0.1:8470 (see Vagrantfile)
.venv/bin/leaktap demo
