#!/usr/bin/env bash
# Fill .ci/wheelhouse/ (git-ignored) with what `.ci/gpu` installs on a GPU machine that reaches
# no package registry: DeepSpeed (built here as a pure-Python wheel; its ops compile on the GPU
# machine when asked) and its dependencies, for CPython 3.12 on manylinux x86_64, without torch
# and numpy (the GPU image has both), plus setuptools (to install harmony editable offline).
# Run it on a machine with PyPI access, from anywhere:
#
#   bash .ci/gpu-wheels.sh          # then carry .ci/wheelhouse to the GPU machine with the tree
#
# Env: DS_VERSION (default: the one tested here), PYTHON (default python; needs pip and torch,
# which DeepSpeed's setup imports).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python}
DS_VERSION=${DS_VERSION:-0.19.8}
HOUSE=.ci/wheelhouse
TARGET=(--only-binary=:all: --implementation cp --python-version 3.12 --abi cp312 --abi abi3
        --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux_2_28_x86_64 --platform any)
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "gpu-wheels: $*"; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
rm -rf "$HOUSE"
mkdir -p "$HOUSE"

# 1. DeepSpeed is published as a source distribution only. Build it here without compiling any
#    op (DS_BUILD_OPS=0) and without build isolation (its setup imports the torch installed
#    here, which must not be downloaded): the wheel is pure Python, for any CPython 3.
say "building deepspeed==$DS_VERSION (pure Python)"
"$PYTHON" -m pip download -q --no-deps --no-binary deepspeed "deepspeed==$DS_VERSION" -d "$tmp"
DS_BUILD_OPS=0 DS_ACCELERATOR=cpu "$PYTHON" -m pip wheel -q --no-deps --no-build-isolation \
    "$tmp"/deepspeed-"$DS_VERSION".tar.gz -w "$HOUSE" >"$tmp/build.log" 2>&1 \
    || { tail -20 "$tmp/build.log"; exit 1; }
wheel=$(ls "$HOUSE"/deepspeed-*.whl)

# 2. Its requirements (from the wheel's metadata) except torch and numpy, with every
#    transitive dependency, as wheels for the GPU machine's Python.
mapfile -t reqs < <("$PYTHON" - "$wheel" <<'PY'
import re, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if line.startswith("Requires-Dist:") and "extra ==" not in line:
            req = line.split(":", 1)[1].split(";")[0].strip()
            name = re.split(r"[<>=!~ \[(]", req, maxsplit=1)[0].lower()
            if name not in ("torch", "numpy"):
                print(req)
PY
)
say "downloading ${#reqs[@]} requirements: ${reqs[*]}"
"$PYTHON" -m pip download -q "${TARGET[@]}" -d "$HOUSE" "${reqs[@]}" "setuptools>=64"
# (a requirement of a requirement may ask for numpy or torch: never carry them)
rm -f "$HOUSE"/numpy-*.whl "$HOUSE"/torch-*.whl "$HOUSE"/nvidia_*.whl "$HOUSE"/triton-*.whl

size=$(du -sb "$HOUSE" | cut -f1)
say "$(ls "$HOUSE" | wc -l) wheels, $((size / 1024)) KiB in $HOUSE:"
ls -1 "$HOUSE" | sed 's/^/  /'
if [ "$size" -gt $((48 << 20)) ]; then
    say "the wheelhouse is over 48 MiB: a working tree travels up to 64 MiB; trim it"
    exit 1
fi
