#!/usr/bin/env bash
# The full CIFAR-10 recipe on one GPU machine: ours (the README's command) and the official PyTorch
# recipe on the same card, JSON lines to $OUT/gpu_cifar.jsonl as results come (see gpu_cifar.py).
#
#   bash benchmarks/gpu_cifar.sh              # on the GPU machine, from the repository root
#   DRY_RUN=1 bash benchmarks/gpu_cifar.sh    # anywhere: 1 epoch of 3 steps a side, TensorFlow hidden
#
# The GPU image has JAX, PyTorch and torchvision but neither Keras nor TensorFlow: wheels of keras and
# the two of its needs the image lacks (namex, optree) and the data archive travel in $CARRY:
#   echo /.gpu_carry/ >> .git/info/exclude; mkdir -p .gpu_carry
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       -d .gpu_carry keras==3.15.1 namex==0.1.0 optree==0.20.0
#   cp ../shared/datasets/cifar10-train-jpeg.tar.gz .gpu_carry/
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
OUT="${OUT:-/tmp/gpu_cifar_out}"
CARRY="${CARRY:-$REPO/.gpu_carry}"
PY="${PYTHON:-python3}"
DATA_ROOT="${DATA_ROOT:-/tmp/cifar10}"
mkdir -p "$OUT"
T0=$(date +%s)
note() { echo "[gpu_cifar.sh +$(($(date +%s) - T0))s] $*"; }

# Only where Keras is missing (the GPU image): a machine that has it keeps its own.
if ! "$PY" -c "import keras" 2>/dev/null && compgen -G "$CARRY/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu_cifar_site \
        "$CARRY"/*.whl || { note "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH="/tmp/gpu_cifar_site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The package itself runs from the checkout, not installed: its install_requires name TensorFlow.
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [ ! -d "$DATA_ROOT/train" ]; then
    TGZ=""
    for candidate in "${CIFAR_TGZ:-}" "$CARRY/cifar10-train-jpeg.tar.gz" "$REPO/shared/datasets/cifar10-train-jpeg.tar.gz" \
        "$REPO/../shared/datasets/cifar10-train-jpeg.tar.gz"; do
        if [ -n "$candidate" ] && [ -f "$candidate" ]; then TGZ="$candidate"; break; fi
    done
    [ -n "$TGZ" ] || { note "no cifar10-train-jpeg.tar.gz (set CIFAR_TGZ or put it in $CARRY)"; exit 1; }
    mkdir -p "$DATA_ROOT" && tar -xzf "$TGZ" -C "$DATA_ROOT" || exit 1
    note "extracted $TGZ into $DATA_ROOT"
fi

# `convmixer-train` is the console script pip would install: the same entry point, put on the PATH.
if [ -x "$(dirname "$(command -v "$PY")")/convmixer-train" ]; then
    export PATH="$(dirname "$(command -v "$PY")"):$PATH"
elif ! command -v convmixer-train >/dev/null; then
    mkdir -p /tmp/gpu_cifar_bin
    printf '#!/bin/sh\nexec "%s" -c "import sys; from keras_convmixer.cli.train import main; sys.exit(main())" "$@"\n' \
        "$(command -v "$PY")" >/tmp/gpu_cifar_bin/convmixer-train
    chmod +x /tmp/gpu_cifar_bin/convmixer-train
    export PATH="/tmp/gpu_cifar_bin:$PATH"
fi

EXTRA=()
if [ -n "${DRY_RUN:-}" ]; then
    EXTRA+=(--dry-run)
    # As on the GPU machine: TensorFlow cannot be imported (every import finder is told to miss it).
    mkdir -p /tmp/gpu_cifar_hide_tf
    cat >/tmp/gpu_cifar_hide_tf/sitecustomize.py <<'PYEOF'
import sys


class _HideTensorFlow:
    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attr):
        return getattr(self.finder, attr)


sys.meta_path[:] = [_HideTensorFlow(f) for f in sys.meta_path]
PYEOF
    export PYTHONPATH="/tmp/gpu_cifar_hide_tf:$PYTHONPATH"
    "$PY" -c "import tensorflow" 2>/dev/null && { note "TensorFlow was not hidden"; exit 1; }
    note "dry run: TensorFlow hidden"
fi
note "data $DATA_ROOT/train, results $OUT/gpu_cifar.jsonl"
"$PY" benchmarks/gpu_cifar.py --data "$DATA_ROOT/train" --out "$OUT/gpu_cifar.jsonl" --run-dir /tmp/gpu_cifar_run \
    "${EXTRA[@]}" "$@"
rc=$?
note "done (rc $rc)"
exit $rc
