#!/usr/bin/env bash
# The desktop bundle, checked: build it (or reuse dist/edgetrain), open it under Xvfb and
# prove its window appears (with EdgeTrain's icon), time the start-up, report the size, and
# check that the bundle is the controller without torch.
#
#   bash packaging/check_bundle.sh            # reuse dist/edgetrain if built
#   REBUILD=1 bash packaging/check_bundle.sh  # build it afresh first
#   RUNS=5 bash packaging/check_bundle.sh     # more starts for the timing (default 3)
#
# Slow (a build takes minutes): not part of the pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
exe=dist/edgetrain/edgetrain
if [ -n "${REBUILD:-}" ] || [ ! -x "$exe" ]; then
  t0=$(date +%s)
  bash packaging/bundle.sh
  echo "build: $(( $(date +%s) - t0 )) s"
fi
if find dist/edgetrain -maxdepth 2 \( -name 'torch' -o -name 'transformers' \) | grep -q .; then
  echo "FAIL: the bundle holds torch or transformers; packaging/bundle.sh excludes them" >&2
  exit 1
fi
# every library in the bundle finds what it links against (after bundle.sh's pruning),
# except the desktop session's own: Qt loads its Wayland and GTK-theme plugins only in a
# Wayland or GNOME session, which has libwayland-* and GTK
broken=$(find dist/edgetrain -name '*.so*' -type f -print0 | xargs -0 -n 50 ldd 2>/dev/null |
         grep "not found" | grep -Ev "lib(wayland-[a-z]+|gtk-3|gdk-3)\.so" | sort -u || true)
if [ -n "$broken" ]; then
  echo "FAIL: libraries of the bundle cannot be found:" >&2
  echo "$broken" >&2
  exit 1
fi
# the command line works from the bundle, and says what it cannot do there
home=$(mktemp -d /tmp/edgetrain-bundle-home.XXXXXX)
trap 'rm -rf "$home"' EXIT
EDGETRAIN_HOME=$home QT_QPA_PLATFORM=offscreen "$exe" gui --check | sed 's/^/gui --check: /'
if EDGETRAIN_HOME=$home "$exe" export no-such-run 2>"$home/err"; then
  echo "FAIL: export ran from the bundle, which has no torch" >&2
  exit 1
fi
grep -q "needs the worker extra" "$home/err" || { cat "$home/err" >&2; exit 1; }
echo "export from the bundle: refused with the fix ($(cut -c1-90 "$home/err")...)"
bash packaging/smoke_window.sh bundle "$exe"
# installed like an app (into a scratch prefix), then started as the menu entry says
PREFIX="$home/prefix" bash packaging/bundle.sh --install-only
entry="$home/prefix/share/applications/edgetrain.desktop"
grep -q '^Icon=edgetrain$' "$entry" && [ -f "$home/prefix/share/icons/hicolor/256x256/apps/edgetrain.png" ] ||
  { echo "FAIL: the menu entry's icon is not installed" >&2; exit 1; }
read -r -a exec_cmd <<<"$(sed -n 's/^Exec=//p' "$entry")"
RUNS=1 bash packaging/smoke_window.sh "menu entry" "${exec_cmd[@]}"
echo "bundle size: $(du -sh dist/edgetrain | cut -f1) (dist/edgetrain)"
