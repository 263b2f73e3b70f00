#!/usr/bin/env bash
# `make lint`: ruff over the tree, strict mypy over the package as it is imported.
#
# The editable install maps `leaktap.controller` onto controller/ through a setuptools
# import hook that mypy cannot follow, so every `leaktap.*` import used to become Any.
# mypy instead reads a shadow tree of links, build/mypy/leaktap/{bpf,controller,analytics},
# where the package layout is the real one and every intra-project import resolves
# (pyproject.toml makes an unresolved `leaktap.*` import an error, not a silent Any).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
PY="$VENV/bin/python"

"$PY" -c "import ruff, mypy" 2>/dev/null || {
    echo "lint: installing the dev tools (ruff, mypy) into $VENV"
    "$VENV/bin/pip" install -q -e "$ROOT[test,dev]"
}

shadow="$ROOT/build/mypy"
rm -rf "$shadow"
mkdir -p "$shadow/leaktap"
for top in bpf controller analytics; do
    ln -s "$ROOT/$top" "$shadow/leaktap/$top"
done

cd "$ROOT"
"$PY" -m ruff check .
cd "$shadow"
"$PY" -m mypy --config-file "$ROOT/pyproject.toml" --cache-dir "$ROOT/build/mypy-cache" -p leaktap
