#!/usr/bin/env bash
# Installs everything this project needs, from its own files, into the current Python environment.
# Skips what is already there; the mmcv build (about 10 minutes on 2 cores) is cached as a wheel in
# ${SCALABLEVIT_CACHE:-~/.cache/scalablevit} so a second install takes seconds.
#
#   bash install.sh            # everything: backbone, classification, detection, segmentation, tests
#   bash install.sh --no-mm    # only the backbone and classification (no OpenMMLab stack)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python}
CACHE=${SCALABLEVIT_CACHE:-$HOME/.cache/scalablevit}
MMCV_VERSION=2.1.0
with_mm=1
[[ "${1:-}" == "--no-mm" ]] && with_mm=0

log() { echo "[install] $*"; }
pipi() { "$PY" -m pip install --disable-pip-version-check --progress-bar off "$@"; }

log "python: $("$PY" --version 2>&1)"
pipi -r requirements.txt
pipi --no-deps --no-build-isolation -e .

if [[ $with_mm == 1 ]]; then
  # setuptools < 81 keeps pkg_resources, which mmcv's setup.py and mmengine need (torch pulls a newer one).
  pipi "setuptools>=77.0.3,<81" wheel ninja psutil
  pipi mmengine==0.10.7
  if "$PY" - <<PYEOF 2>/dev/null
import mmcv, mmcv.ops
assert mmcv.__version__ == "$MMCV_VERSION"
mmcv.ops.nms
PYEOF
  then
    log "mmcv $MMCV_VERSION with compiled ops: already installed"
  else
    tag=$("$PY" -c "import sys, torch; print(f'cp{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}')")
    wheel_dir="$CACHE/wheels/$tag"
    mkdir -p "$wheel_dir"
    whl=$(ls "$wheel_dir"/mmcv-$MMCV_VERSION-*.whl 2>/dev/null | head -n 1 || true)
    if [[ -z "$whl" ]]; then
      log "building mmcv $MMCV_VERSION with ops against torch (about 10 minutes on 2 cores)"
      src=$(mktemp -d)
      "$PY" -m pip download --no-deps --no-build-isolation --no-binary mmcv "mmcv==$MMCV_VERSION" -d "$src"
      tar xzf "$src/mmcv-$MMCV_VERSION.tar.gz" -C "$src"
      # torch 2.14's headers need C++20; mmcv 2.1.0 forces -std=c++17 last on the compile line.
      sed -i "s/'-std=c++17'\]/'-std=c++20']/" "$src/mmcv-$MMCV_VERSION/setup.py"
      MMCV_WITH_OPS=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip wheel --no-deps --no-build-isolation \
        "$src/mmcv-$MMCV_VERSION" -w "$wheel_dir"
      rm -rf "$src"
      whl=$(ls "$wheel_dir"/mmcv-$MMCV_VERSION-*.whl | head -n 1)
    fi
    log "installing $whl"
    pipi --no-deps --force-reinstall "$whl"
    pipi "$whl"   # its run-time dependencies (addict, yapf, ...)
    "$PY" -c "import mmcv.ops; mmcv.ops.nms" || { echo "[install] mmcv built but its ops do not import" >&2; exit 1; }
  fi
  pipi -r requirements/mm.txt
fi
log "done"
