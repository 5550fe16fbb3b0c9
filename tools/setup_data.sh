#!/usr/bin/env bash
# Ensure the Fashion-MNIST dataset (used by tools/train_default_model.py) is installed.
# Idempotent: does nothing if the files are already present.
set -euo pipefail

DATA_DIR=/usr/share/datasets/fashion-mnist
MARKER="$DATA_DIR/t10k-images-idx3-ubyte.gz"

if [ -f "$MARKER" ]; then
    echo "setup_data: Fashion-MNIST already present in $DATA_DIR; nothing to do."
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    SUDO=""
else
    SUDO="sudo"
fi

echo "setup_data: $MARKER missing; running ${SUDO:+$SUDO }apt-get update"
$SUDO apt-get update
echo "setup_data: installing dataset-fashion-mnist"
$SUDO apt-get install -y dataset-fashion-mnist

if [ -f "$MARKER" ]; then
    echo "setup_data: installed Fashion-MNIST into $DATA_DIR."
else
    echo "setup_data: ERROR: $MARKER still missing after install." >&2
    exit 1
fi
