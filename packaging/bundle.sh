#!/usr/bin/env bash
# Build EdgeTrain's desktop bundle with PyInstaller: dist/edgetrain/, one folder holding
# the controller, its GUI and a Python; no torch (the controller never imports it: the
# worker code travels to the devices as source files, kept in the bundle for that).
#
#   bash packaging/bundle.sh              # build dist/edgetrain/edgetrain
#   bash packaging/bundle.sh --install    # and install it for this user: ~/.local/opt/edgetrain,
#                                         # ~/.local/bin/edgetrain, the menu entry and the icon
#   PREFIX=/opt/local bash packaging/bundle.sh --install   # elsewhere
#   bash packaging/bundle.sh --install-only   # install the dist/edgetrain already built
#
# Started without arguments the bundle opens the control panel; with arguments it is the
# edgetrain command line (edgetrain plan ..., edgetrain gui --check). Needs .venv with the
# gui extra (packaging/setup.sh); installs the bundle extra (PyInstaller) into it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
mode=${1:-build}
case "$mode" in
  build | --install | --install-only) ;;
  *) echo "usage: bash packaging/bundle.sh [--install | --install-only]" >&2; exit 2 ;;
esac
if [ "$mode" = --install-only ]; then
  [ -x dist/edgetrain/edgetrain ] || { echo "error: no dist/edgetrain yet. Fix: bash packaging/bundle.sh" >&2; exit 2; }
elif [ ! -x "$PY" ]; then
  echo "error: no .venv here. Fix: bash packaging/setup.sh" >&2
  exit 2
fi
build() {
  if ! "$PY" -c "import PyInstaller, PySide6" 2>/dev/null; then
    "$PY" -m pip install -q --disable-pip-version-check -e ".[gui,bundle]"
  fi

  # The worker code is pushed to devices as .py files (app/devices/remote.py reads them from
  # the workers package's folder), so it goes in as data too, beside its compiled modules.
  # (absolute sources: PyInstaller reads relative ones from the spec's folder, build/bundle)
  data=(--add-data "$PWD/assets/edgetrain.svg:assets")
  for size in 48 128 256; do data+=(--add-data "$PWD/assets/edgetrain-$size.png:assets"); done
  while IFS= read -r dir; do
    data+=(--add-data "$PWD/$dir/*.py:$dir")
  done < <(find workers -name '*.py' -not -path '*/__pycache__/*' -printf '%h\n' | sort -u)

  # Not the controller's: torch and the model stack (workers/ on the devices and the local
  # testbed need them), and what only they or the test tools pull in.
  excludes=()
  for m in torch torchvision torchaudio triton transformers tokenizers safetensors huggingface_hub \
           sympy networkx jinja2 mpmath hypothesis pytest _pytest pytestqt IPython matplotlib scipy \
           pandas tkinter PyQt5 PyQt6 PySide2 pyqtgraph.opengl pyqtgraph.examples OpenGL cupy numba; do
    excludes+=(--exclude-module "$m")
  done

  "$PY" -m PyInstaller --noconfirm --log-level WARN --onedir --name edgetrain \
    --distpath dist --workpath build/bundle --specpath build/bundle \
    --paths "$PWD" --collect-submodules app \
    "${data[@]}" "${excludes[@]}" \
    "$PWD/packaging/edgetrain_gui.py"
  # Qt plugins the control panel never loads that drag in Qt Quick/QML: the on-screen virtual
  # keyboard and the PDF image format. Then the Qt libraries nothing left links against.
  qt=dist/edgetrain/_internal/PySide6/Qt
  rm -f "$qt/plugins/platforminputcontexts/libqtvirtualkeyboardplugin.so" "$qt/plugins/imageformats/libqpdf.so"
  unused='libQt6(Pdf|Quick|Qml|QmlModels|QmlMeta|QmlWorkerScript|VirtualKeyboard|VirtualKeyboardQml)\.so\.6'
  needed=$(find dist/edgetrain -name '*.so*' -type f | grep -Ev "/$unused\$" | tr '\n' '\0' |
           xargs -0 -n 50 ldd 2>/dev/null | awk '$2 == "=>" {print $1}' | sort -u)
  find dist/edgetrain -name '*.so*' | grep -E "/$unused\$" | while read -r f; do
    grep -qx "$(basename "$f")" <<<"$needed" || rm -f "$f"
  done
  echo "bundle: $(du -sh dist/edgetrain | cut -f1) in dist/edgetrain (run dist/edgetrain/edgetrain)" >&2
}

[ "$mode" = --install-only ] || build
if [ "$mode" = --install ] || [ "$mode" = --install-only ]; then
  prefix=${PREFIX:-$HOME/.local}
  target="$prefix/opt/edgetrain"
  # replace only a previous bundle, never a folder of the user's that happens to be there
  if [ -e "$target" ] && [ ! -x "$target/edgetrain" ]; then
    echo "error: $target exists and is not an EdgeTrain bundle. Fix: move it away, or set PREFIX" >&2
    exit 2
  fi
  rm -rf "$target.new"
  mkdir -p "$prefix/opt" "$prefix/bin"
  cp -a dist/edgetrain "$target.new"
  rm -rf "$target"
  mv "$target.new" "$target"
  # the command on PATH; a file there that is not our link (a pip install's script) stays
  if [ -e "$prefix/bin/edgetrain" ] && [ ! -L "$prefix/bin/edgetrain" ]; then
    echo "note: $prefix/bin/edgetrain is another install's; left as it is (the bundle: $target/edgetrain)" >&2
  else
    ln -sfn "$target/edgetrain" "$prefix/bin/edgetrain"
  fi
  # the menu entry runs the bundle by its full path: it works whatever PATH holds
  mkdir -p "$prefix/share/applications"
  sed -e "s|^Exec=edgetrain|Exec=$target/edgetrain|" -e "s|^TryExec=edgetrain|TryExec=$target/edgetrain|" \
    packaging/edgetrain.desktop > "$prefix/share/applications/edgetrain.desktop"
  for size in 48 128 256; do
    install -D -m 644 "assets/edgetrain-$size.png" "$prefix/share/icons/hicolor/${size}x${size}/apps/edgetrain.png"
  done
  install -D -m 644 assets/edgetrain.svg "$prefix/share/icons/hicolor/scalable/apps/edgetrain.svg"
  command -v update-desktop-database >/dev/null 2>&1 && update-desktop-database -q "$prefix/share/applications" || true
  # refresh an icon cache that exists (a stale one hides the new icon); never start one
  cache="$prefix/share/icons/hicolor/icon-theme.cache"
  if [ -f "$cache" ] && command -v gtk-update-icon-cache >/dev/null 2>&1; then
    gtk-update-icon-cache -q -t "$prefix/share/icons/hicolor" || true
  fi
  echo "installed: $target (command $prefix/bin/edgetrain, menu entry" \
    "$prefix/share/applications/edgetrain.desktop)" >&2
fi
