#!/usr/bin/env bash
# Set up EdgeTrain in ./.venv on a fresh machine (controller and local testbed).
#   TORCH_SPEC   torch requirement to install (default torch==2.13.0: the CPU wheel these
#                machines carry on disk; an unpinned torch pulls a multi-GB CUDA build)
#   EXTRAS       optional dependency groups (default gui,test)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-gui,test}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
.venv/bin/python -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[${EXTRAS}]"
# The realistic tier (network namespaces + OpenSSH sshd) needs root and sshd; install it
# when we can, skip quietly otherwise (its tests skip with the reason).
if [ "$(id -u)" = 0 ] && ! command -v sshd >/dev/null 2>&1 && [ ! -x /usr/sbin/sshd ] && command -v apt-get >/dev/null; then
  (DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server >/dev/null 2>&1 ||
   (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssh-server >/dev/null 2>&1)) ||
   echo "note: could not install openssh-server; the netns tier tests will skip" >&2
fi
echo "EdgeTrain is set up in $(pwd)/.venv" >&2
