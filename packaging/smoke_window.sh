#!/usr/bin/env bash
# Open EdgeTrain's window on a virtual X display and prove it appears; time the start-up.
#
#   bash packaging/smoke_window.sh LABEL COMMAND...   # e.g. fresh .venv/bin/edgetrain gui
#
# Each of RUNS starts (default 3) runs COMMAND under `xvfb-run -a` with QT_QPA_PLATFORM=xcb
# and EDGETRAIN_SMOKE set, so the app prints one line once its main window is exposed on
# the display (with its start-up time: process start to window shown), keeps the window
# HOLD_S seconds (default 2) while `xwininfo` confirms the X server lists that window (and
# `xprop` whether it carries EdgeTrain's icon), then closes it. A fresh EDGETRAIN_HOME keeps the user's state out of it.
# Exit status 0 only if every start showed the window.
set -euo pipefail
label=$1
shift
RUNS=${RUNS:-3}
HOLD_S=${HOLD_S:-2}
TIMEOUT_S=${TIMEOUT_S:-180}
if ! command -v xvfb-run >/dev/null 2>&1; then
  echo "error: xvfb-run is missing. Fix: apt-get install -y xvfb xauth (packaging/setup.sh does, as root)" >&2
  exit 2
fi
work=$(mktemp -d /tmp/edgetrain-smoke.XXXXXX)
trap 'rm -rf "$work"' EXIT

# runs inside the X session: start the app, wait for its line, ask the X server, wait for exit
cat > "$work/inner.sh" <<'EOF'
set -u
log=$1; shift
t0=$(date +%s.%N)
"$@" > "$log" 2>&1 &
pid=$!
seen=""
while kill -0 "$pid" 2>/dev/null; do
  if grep -q "EDGETRAIN_SMOKE window shown" "$log" 2>/dev/null; then seen=$(date +%s.%N); break; fi
  sleep 0.05
done
listed=no
icon=no
if [ -n "$seen" ] && command -v xwininfo >/dev/null 2>&1; then
  # the window the app says it showed, by its title, as the X server lists it
  title=$(sed -n "s/.*title='\([^']*\)'.*/\1/p" "$log" | head -1)
  id=$(xwininfo -root -tree | grep -F "\"$title\"" | awk '{print $1}' | head -1)
  if [ -n "$id" ]; then
    listed=yes
    xprop -id "$id" _NET_WM_ICON 2>/dev/null | grep -q "Icon (" && icon=yes
  fi
elif [ -n "$seen" ]; then
  listed="unknown (no xwininfo: apt-get install x11-utils)"
fi
wait "$pid"
rc=$?
wall=$([ -n "$seen" ] && awk -v a="$seen" -v b="$t0" 'BEGIN {printf "%.2f", a - b}' || echo "-")
echo "SMOKE_RESULT rc=$rc listed=$listed icon=$icon launch_to_line_s=$wall" >> "$log"
EOF

fails=0
startups=()
cpus=()
for i in $(seq 1 "$RUNS"); do
  log="$work/run$i.log"
  env EDGETRAIN_HOME="$work/home$i" EDGETRAIN_SMOKE="$HOLD_S" QT_QPA_PLATFORM=xcb \
    timeout "$TIMEOUT_S" xvfb-run -a -s "-screen 0 1400x900x24" bash "$work/inner.sh" "$log" "$@" || true
  shown=$(grep -m1 "EDGETRAIN_SMOKE window shown" "$log" 2>/dev/null || true)
  result=$(grep -m1 "SMOKE_RESULT" "$log" 2>/dev/null || echo "SMOKE_RESULT rc=timeout")
  if [ -n "$shown" ] && [[ "$result" == *"rc=0 listed=yes"* || "$result" == *"rc=0 listed=unknown"* ]]; then
    startup=$(sed -n 's/.*startup_s=\([0-9.]*\).*/\1/p' <<<"$shown")
    cpu=$(sed -n 's/.*cpu_s=\([0-9.]*\).*/\1/p' <<<"$shown")
    startups+=("$startup")
    cpus+=("$cpu")
    echo "$label run $i: window shown, start-up ${startup} s (process start to window exposed; ${cpu} s CPU);" \
      "${result#SMOKE_RESULT }"
  else
    fails=$((fails + 1))
    echo "$label run $i: FAILED (${result#SMOKE_RESULT }); the app said:" >&2
    tail -20 "$log" >&2 || true
  fi
done
if [ "${#startups[@]}" -gt 0 ]; then
  median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
  echo "$label: window shown in $((RUNS - fails))/$RUNS starts; start-up median $(median "${startups[@]}") s" \
    "(runs: ${startups[*]}), CPU median $(median "${cpus[@]}") s; load average $(cut -d' ' -f1-3 /proc/loadavg)" \
    "on $(nproc) cores"
fi
[ "$fails" -eq 0 ]
