#!/usr/bin/env bash
# Install detectron2 into the given Python environment, unless it is already importable
# (for example a user's own source build with CUDA ops).
#
# detectron2 is not published on the package index under its own name. Here we install
# `sal-detectron2`, a repackaged detectron2 whose only wheel is tagged for CPython 3.10 although
# its Python code is version-independent: download it for 3.10, retag it as py3-none-any and
# install it without dependencies (requirements.txt lists what it needs).
# Upstream users with internet access can instead run:
#   pip install 'git+https://github.com/facebookresearch/detectron2.git'
set -euo pipefail
PYTHON=${1:-python}
VERSION=0.7.2

if "$PYTHON" -c "import detectron2" 2>/dev/null; then
    echo "detectron2 already importable: $("$PYTHON" -c 'import detectron2, os; print(os.path.dirname(detectron2.__file__))')"
    exit 0
fi

WHEELDIR=$(mktemp -d)
trap 'rm -rf "$WHEELDIR"' EXIT
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.10 \
    -d "$WHEELDIR" "sal-detectron2==$VERSION"
src=$(ls "$WHEELDIR"/sal_detectron2-"$VERSION"-*.whl)
dst="$WHEELDIR/sal_detectron2-$VERSION-py3-none-any.whl"
mv "$src" "$dst"
"$PYTHON" -m pip install --no-deps "$dst"
"$PYTHON" -c "import detectron2; print('installed detectron2', detectron2.__version__)"
