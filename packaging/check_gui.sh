#!/usr/bin/env bash
# Issue 14, acceptance 1: on a fresh clone, README command 1's set-up (packaging/setup.sh)
# and then `edgetrain gui` under Xvfb shows the control panel's window.
#
#   bash packaging/check_gui.sh               # a copy of this checkout as a commit would hold
#                                             # it (tracked + new files git does not ignore)
#   SOURCE=head bash packaging/check_gui.sh   # a git clone of HEAD instead
#   KEEP=1 ...                                # keep the clone (its path is printed)
#
# Slow (a fresh .venv: minutes): not part of the pytest run.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d /tmp/edgetrain-fresh.XXXXXX)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$tmp"' EXIT
clone="$tmp/edgetrain"
if [ "${SOURCE:-worktree}" = head ]; then
  git clone -q "$here" "$clone"
else
  mkdir -p "$clone"
  (cd "$here" && git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
    | tar -xf - -C "$clone"
fi
echo "fresh clone: $clone ($(cd "$clone" && find . -type f | wc -l) files, no .venv)"
cd "$clone"
t0=$(date +%s)
bash packaging/setup.sh
echo "set-up: $(( $(date +%s) - t0 )) s"
xvfb-run -a .venv/bin/edgetrain gui --check | sed "s/^/gui --check (Xvfb): /" || true
bash packaging/smoke_window.sh "fresh clone" .venv/bin/edgetrain gui
