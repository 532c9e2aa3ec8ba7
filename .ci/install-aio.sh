#!/usr/bin/env bash
# Install DeepSpeed's async I/O (libaio) op for the NVMe store and build it ahead of time, so
# that tests/swap/test_nvme.py exercises the "aio" backend. Idempotent; run as root on Debian with
# Python and torch already installed. Never fails the caller: whatever step fails is reported
# and the store (and its tests) use the O_DIRECT backend instead.
#
#   bash .ci/install-aio.sh            # then: python -m pytest tests/swap/test_nvme.py
#
# Env: TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions; swap/aio.py looks there too),
#      PYTHON (default python).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."  # the repository root, for `import swap`

PYTHON=${PYTHON:-python}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}  # no GPU probing on CPU machines

say() { echo "install-aio: $*"; }
give_up() { say "$* -- the NVMe store will use O_DIRECT threads instead"; exit 0; }

# 1. libaio headers and library (the op links against -laio).
if ! dpkg -s libaio-dev >/dev/null 2>&1; then
    say "installing libaio-dev"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev; } \
            >/tmp/install-aio-apt.log 2>&1; then
        tail -5 /tmp/install-aio-apt.log
        give_up "apt-get install libaio-dev failed"
    fi
fi

# 2. DeepSpeed, pinned to the torch already here (a bare `pip install deepspeed` may pull
#    another torch, a multi-GB CUDA build).
if ! "$PYTHON" -c "import deepspeed" >/dev/null 2>&1; then
    torch_version=$("$PYTHON" -c "import torch; print(torch.__version__.split('+')[0])") \
        || give_up "torch is not importable with $PYTHON"
    say "installing deepspeed (keeping torch==$torch_version)"
    if ! "$PYTHON" -m pip install -q deepspeed "torch==$torch_version" >/tmp/install-aio-pip.log 2>&1; then
        tail -5 /tmp/install-aio-pip.log
        give_up "pip install deepspeed failed"
    fi
fi

# 3. Build the op into TORCH_EXTENSIONS_DIR (5-15 minutes the first time, seconds after).
#    A build killed half-way leaves a lock file that would make every later load wait forever.
for op in pin_memory async_io; do
    if [ -e "$TORCH_EXTENSIONS_DIR/$op/lock" ]; then
        say "removing the stale build lock $TORCH_EXTENSIONS_DIR/$op/lock"
        rm -f "$TORCH_EXTENSIONS_DIR/$op/lock"
    fi
done
say "building the DeepSpeed async I/O op in $TORCH_EXTENSIONS_DIR"
if ! "$PYTHON" - >/tmp/install-aio-build.log 2>&1 <<'EOF'
import sys, tempfile, time
t0 = time.time()
from swap.aio import AioIO, load_aio_op  # noqa: E402  (run from the repository root)

op = load_aio_op(build=True)
AioIO(op)  # a handle starts its threads: proves the .so loads and links libaio
print(f"async_io op ready in {time.time() - t0:.0f} s")
EOF
then
    tail -20 /tmp/install-aio-build.log
    give_up "building the DeepSpeed async I/O op failed (full log: /tmp/install-aio-build.log)"
fi
tail -1 /tmp/install-aio-build.log
say "ok: tests/swap/test_nvme.py will run the aio backend"
