#!/usr/bin/env bash
# Fill .whl/ at the repository root with the pure-Python wheels benchmarks/device_check.sh installs on a GPU image
# that has no package index (Python 3.12 there): timm at the version installed here, and any NAME==VERSION given.
# Run it on a machine with PyPI; .whl/ is ignored through .git/info/exclude and never committed.
#
#   bash benchmarks/fetch_device_wheels.sh                      # timm==<the version here>
#   bash benchmarks/fetch_device_wheels.sh safetensors==0.6.2   # and more pins
#
# Then carry .whl to the GPU machine with the working tree; device_check.sh installs what it finds there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "${PYTHON:-}" ]]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
timm_version=$("$PYTHON" -c 'import timm; print(timm.__version__)')
pins=("timm==$timm_version" "$@")
mkdir -p .whl
for pin in "${pins[@]}"; do
    name="${pin%%==*}"
    # one version of each package: two wheels of one name stop the whole install on the device
    find .whl -maxdepth 1 -iname "$(tr '-' '_' <<<"$name")-*.whl" ! -iname "$(tr '-' '_' <<<"$name")-${pin#*==}-*" \
        -print -delete
done
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
echo "[fetch_device_wheels] .whl/ holds:"
ls -l .whl/*.whl
