#!/usr/bin/env bash
# Set up EdgeTrain in ./.venv on a fresh machine (controller, GUI and local testbed).
#   TORCH_SPEC   torch requirement to install (default torch==2.13.0: the CPU wheel these
#                machines carry on disk; an unpinned torch pulls a multi-GB CUDA build)
#   EXTRAS       optional dependency groups (default worker,gui,test). The base install is
#                the controller alone (no torch): EXTRAS= bash packaging/setup.sh
# As root on Debian/Ubuntu it also installs, when missing, the system libraries Qt's xcb
# platform needs (else it prints the apt-get line), Xvfb (xvfb-run, for the GUI checks) and
# OpenSSH's server (for the network-namespace test tier). A failed apt-get is a note, not
# the end of the set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS-worker,gui,test}
has_extra() { [[ ",$EXTRAS," == *",$1,"* ]]; }
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
# apt_install PKG...: quietly; on failure refresh the package lists once and retry
apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null 2>&1 &&
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; }
}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
if has_extra worker; then
  .venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"

if has_extra gui; then
  # the libraries PySide6's xcb plugin and Qt libraries cannot find (ldd), as apt packages
  missing=$(.venv/bin/python -m app.cli.qtcheck --apt-packages)
  if [ -n "$missing" ]; then
    if can_apt; then
      # shellcheck disable=SC2086  # one word per package
      apt_install $missing ||
        echo "note: could not install the GUI's system libraries; run: apt-get install -y $missing" >&2
    elif command -v apt-get >/dev/null 2>&1; then
      echo "note: the GUI needs system libraries; run: sudo apt-get install -y $missing" >&2
    else
      echo "note: the GUI needs the system packages providing: $missing (edgetrain gui --check says more)" >&2
    fi
  fi
fi
# xvfb-run: a virtual display for the GUI's checks (packaging/check_gui.sh, check_bundle.sh)
if can_apt && ! command -v xvfb-run >/dev/null 2>&1; then
  apt_install xvfb xauth || echo "note: could not install xvfb; the GUI checks under xvfb-run will skip" >&2
fi
# The realistic tier (network namespaces + OpenSSH sshd) needs root and sshd; install it
# when we can, skip quietly otherwise (its tests skip with the reason).
if can_apt && ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ]; then
  apt_install openssh-server || echo "note: could not install openssh-server; the netns tier tests will skip" >&2
fi
echo "EdgeTrain is set up in $(pwd)/.venv" >&2
