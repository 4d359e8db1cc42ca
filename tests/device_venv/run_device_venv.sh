#!/usr/bin/env bash
# CI check for the device role (issue 14): a fresh virtualenv with only `pip install .[device]`
# (no torch, no nvidia packages, no scikit-learn, no amqtt), its size, and a device app from
# it against a real mosquitto + coordinator started from the main .venv.
#
#   tests/device_venv/run_device_venv.sh            # venv in /tmp/edgeci-device-venv
#   DEVICE_VENV=.venv-device MAIN_VENV=.venv tests/device_venv/run_device_venv.sh
#
# Exit status 0 only if the install is lean, fits MAX_MB, and the device predicts, labels
# and picks up a new version.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
DEVICE_VENV=${DEVICE_VENV:-/tmp/edgeci-device-venv}
MAIN_VENV=${MAIN_VENV:-.venv}
MAX_MB=${MAX_MB:-250}

rm -rf "$DEVICE_VENV"
python3 -m venv "$DEVICE_VENV"
# A copy of the tree, so the build never writes into the working tree (build/, *.egg-info).
SRC=$(mktemp -d)
trap 'rm -rf "$SRC"' EXIT
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$SRC"
"$DEVICE_VENV/bin/pip" install -q "$SRC[device]" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)

echo "== installed packages"
"$DEVICE_VENV/bin/pip" list --format=freeze | tee "$SRC/pip-list.txt"
forbidden='^(torch|torchvision|triton|nvidia-[a-z0-9_-]+|scikit-learn|scipy|amqtt|onnx|onnxscript|ultralytics|opencv-python|matplotlib)=='
if grep -Ei "$forbidden" "$SRC/pip-list.txt"; then
  echo "FAIL: the device install pulled in the packages above" >&2
  exit 1
fi

size_mb=$(du -sm "$DEVICE_VENV" | cut -f1)
echo "== device virtualenv: $(du -sh "$DEVICE_VENV" | cut -f1) ($size_mb MB) at $DEVICE_VENV"
if [ "$size_mb" -gt "$MAX_MB" ]; then
  echo "FAIL: $size_mb MB is over the $MAX_MB MB budget" >&2
  exit 1
fi

echo "== device app from the device venv against mosquitto + coordinator from $MAIN_VENV"
timeout 600 "$MAIN_VENV/bin/python" "$ROOT/tests/device_venv/drive.py" "$DEVICE_VENV/bin/python"
