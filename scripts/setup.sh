#!/usr/bin/env bash
# One idempotent setup for a Debian 12 host (also Ubuntu 24.04: vagrant/ runs it):
# apt packages, a kernel-header tree for BCC, bpffs/tracefs mounts and the
# project's virtual environment. Safe to run again; it only does what is missing.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
KREL=$(uname -r)
DISTRO=$(. /etc/os-release && echo "${ID:-debian}")
quiet() { if [ "${V:-0}" = 1 ]; then "$@"; else "$@" >/dev/null; fi; }
say() { printf 'setup: %s\n' "$*"; }

[ "$(id -u)" = 0 ] || { echo "setup: must run as root (BPF, tc and apt need it)" >&2; exit 1; }

# 1. Debian packages. bcc's Python module is python3-bpfcc (not on PyPI).
PKGS=(python3-bpfcc python3-venv python3-dev iproute2 openssl libssl3 iperf3 ethtool
      ca-certificates curl binutils util-linux)
# gcc and libssl-dev compile the fingerprint prefilter (analytics/plaintext/_prefilter.c)
# at `pip install -e .`, on every host (without them the numpy path is used, slower)
PKGS+=(gcc libc6-dev libssl-dev)
# Test tools, on the Debian host only (the Ubuntu VM that vagrant/ makes runs the
# agent and the demo, not the suite; Ubuntu ships chromium only as a snap):
# chromium for the dashboard's browser test, vagrant for `vagrant validate`;
# TLS clients of every kind the coverage report names (issue 13): gcc with
# libssl-dev's libssl.a/libcrypto.a for a statically linked client, Node.js, and
# a JDK (`java Client.java` compiles a single-file source) for a JSSE client.
if [ "$DISTRO" = debian ]; then
    PKGS+=(chromium vagrant nodejs default-jdk-headless)  # gcc, libssl-dev: above
fi
# The Go connector the plaintext tests build from source (issue 13.1), with the
# distribution's toolchain (Debian 12: Go 1.19); the agent itself needs only
# binutils' objdump (above) to find a Go program's return instructions.
if [ "$DISTRO" = debian ]; then PKGS+=(golang-go); fi
missing=()
for p in "${PKGS[@]}"; do
    # Ubuntu 24.04 renamed libssl3 to libssl3t64 (64-bit time_t): either counts
    # (dpkg-query fails for the name that does not exist: pipefail must not see it)
    { dpkg-query -W -f='${Status}\n' "$p" "${p}t64" 2>/dev/null || true; } \
        | grep -q "install ok installed" || missing+=("$p")
done
# BCC compiles against a kernel header tree. Prefer the exact package; this
# machine's kernel is newer than any Debian headers, so fall back to the cloud
# flavour: the programs use only UAPI structures, which are stable. (Ubuntu
# always has linux-headers-$KREL for its own kernels: the fallback is Debian's.)
if [ ! -e "/lib/modules/$KREL/build/include" ]; then
    if apt-cache show "linux-headers-$KREL" >/dev/null 2>&1 || [ "$DISTRO" != debian ]; then
        missing+=("linux-headers-$KREL")
    else
        dpkg-query -W -f='${Status}' linux-headers-cloud-amd64 2>/dev/null \
            | grep -q "install ok installed" || missing+=(linux-headers-cloud-amd64)
    fi
fi
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    quiet apt-get update -qq
    if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
        # linux-headers-$KREL may have vanished between update and install
        missing=("${missing[@]/linux-headers-$KREL/linux-headers-cloud-amd64}")
    fi
    quiet apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# 1b. promtool and amtool (tests/deploy: `promtool test rules`, `amtool check-config`),
# taken out of Debian's prometheus and prometheus-alertmanager packages: installing
# those would start and enable a Prometheus server and an Alertmanager on this
# host, and prometheus pulls ~230 MB of web-console JavaScript besides.
for tool in promtool:prometheus amtool:prometheus-alertmanager; do
    bin=${tool%%:*} pkg=${tool#*:}
    command -v "$bin" >/dev/null 2>&1 && continue
    say "installing $bin from Debian's $pkg package into /usr/local/bin"
    tmp=$(mktemp -d)
    ( cd "$tmp" && quiet apt-get download "$pkg" 2>/dev/null ) \
        || { quiet apt-get update -qq; ( cd "$tmp" && quiet apt-get download "$pkg" ); }
    dpkg-deb --fsys-tarfile "$tmp"/"$pkg"_*.deb | tar -x -C "$tmp" "./usr/bin/$bin"
    install -m 0755 "$tmp/usr/bin/$bin" "/usr/local/bin/$bin"
    rm -rf "$tmp"
done

# 2. Kernel header link (Debian splits the tree: arch part = build, common = source).
if [ ! -e "/lib/modules/$KREL/build/include" ]; then
    hdr=$(ls -d /usr/src/linux-headers-*-cloud-amd64 2>/dev/null | sort -V | tail -n 1)
    [ -n "$hdr" ] || { echo "setup: no kernel header tree found under /usr/src" >&2; exit 1; }
    common=${hdr%-cloud-amd64}-common
    say "linking kernel headers $hdr for $KREL"
    mkdir -p "/lib/modules/$KREL"
    ln -sfn "$hdr" "/lib/modules/$KREL/build"
    [ -d "$common" ] && ln -sfn "$common" "/lib/modules/$KREL/source"
fi

# 3. Mounts: bpffs for pinned maps, tracefs for uprobes/tracepoints.
if ! mountpoint -q /sys/fs/bpf; then
    say "mounting bpffs at /sys/fs/bpf"
    mkdir -p /sys/fs/bpf && mount -t bpf bpf /sys/fs/bpf
fi
if ! mountpoint -q /sys/kernel/tracing && [ -d /sys/kernel/tracing ]; then
    say "mounting tracefs at /sys/kernel/tracing"
    mount -t tracefs tracefs /sys/kernel/tracing || say "tracefs mount failed (uprobes unavailable)"
fi

# 4. Python environment: system site-packages so that `import bcc` works.
if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
    quiet "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.leaktap-installed"
# setup.py and the C it compiles (the fingerprint prefilter) count as well as pyproject.toml
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ] || [ "$ROOT/setup.py" -nt "$stamp" ] \
        || [ "$ROOT/analytics/plaintext/_prefilter.c" -nt "$stamp" ]; then
    say "installing leaktap and its test extras into $VENV"
    quiet "$VENV/bin/pip" install -q -e "$ROOT[test]"
    touch "$stamp"
fi
"$VENV/bin/python" -c "import bcc, leaktap.controller" \
    || { echo "setup: the environment cannot import bcc and leaktap" >&2; exit 1; }
