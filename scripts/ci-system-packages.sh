#!/usr/bin/env bash
# ci-system-packages.sh - install the Debian packages that the tests need, when they are missing.
#
#   scripts/ci-system-packages.sh          (from .ci/run; as root, or a user with sudo)
#
# Idempotent: a package whose command is already installed is left alone, and `apt-get update`
# runs only when something must be installed and apt does not know it yet (a fresh image has
# empty lists) or the install failed on stale lists. Exits non-zero if a package could not be
# installed. A test whose package is missing is skipped, with the reason, by pytest; under
# CI=true that skip is a failure (tests/conftest.py), and so is this script's failure (Makefile).
set -euo pipefail

# command | Debian package | the tests that need it
PACKAGES=(
    "haproxy|haproxy|tests/integration/test_haproxy.py"
    # systemd's own socket activator. Installing the package in a container is harmless: with
    # no systemd running as PID 1 its postinst starts nothing (Debian images ship it often).
    "systemd-socket-activate|systemd|tests/unit/test_systemd.py"
    # setpriv (run the CLI as nobody when the tests run as root); essential, listed to be sure.
    "setpriv|util-linux|tests/integration/test_privileges.py"
)
# Debian installs daemons in sbin, which a non-root PATH may lack.
SBIN=/usr/sbin:/usr/local/sbin:/sbin

missing=()
for entry in "${PACKAGES[@]}"; do
    IFS='|' read -r cmd pkg _ <<<"$entry"
    PATH="$PATH:$SBIN" command -v "$cmd" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "ci-system-packages: all present"
    exit 0
fi

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "ci-system-packages: need root or sudo to install: ${missing[*]}" >&2
        exit 1
    fi
    SUDO=(sudo -n)
fi
apt_get() { "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -q "$@"; }

echo "ci-system-packages: installing ${missing[*]}"
if ! apt-cache show "${missing[@]}" >/dev/null 2>&1; then
    apt_get update
fi
if ! apt_get install -y --no-install-recommends "${missing[@]}"; then
    apt_get update  # lists that name versions the mirror no longer has
    apt_get install -y --no-install-recommends "${missing[@]}"
fi
for entry in "${PACKAGES[@]}"; do
    IFS='|' read -r cmd pkg tests <<<"$entry"
    if ! PATH="$PATH:$SBIN" command -v "$cmd" >/dev/null 2>&1; then
        echo "ci-system-packages: $cmd still missing after installing $pkg ($tests)" >&2
        exit 1
    fi
done
