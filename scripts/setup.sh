#!/usr/bin/env bash
# Installs everything varprune needs on a fresh machine: the Python package with
# its test extras, and the Fashion-MNIST files (Debian package) the demo and the
# tests read. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing the dataset-fashion-mnist Debian package"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "setup: Fashion-MNIST missing; run: sudo apt-get install dataset-fashion-mnist" >&2
    exit 1
  fi
fi

if ! python -c "import varprune, pytest, hypothesis, scipy" 2>/dev/null \
   || [ "$(python -c 'import varprune, os; print(os.path.realpath(varprune.__file__))')" != "$(realpath src/varprune/__init__.py)" ]; then
  echo "setup: pip install -e .[test] (takes torch from the local mirror; about a minute)"
  python -m pip install -q --disable-pip-version-check -e ".[test]"
fi
