#!/usr/bin/env bash
# Installs everything varprune needs on a fresh machine: the Python package with
# its test extras, and the data the demos and tests read from Debian packages:
# Fashion-MNIST (dataset-fashion-mnist), the Colin27 MRI with its AAL labels
# (mricron-data), the BSD quotations the language-model demo and tests train on (fortunes),
# and headless Chromium for the HTML report test (optional:
# that one test is skipped, with its reason, where it cannot be installed).
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
[ -f /usr/share/mricron/templates/aal.nii.gz ] || need+=(mricron-data)
[ -f /usr/share/games/fortunes/fortunes ] || need+=(fortunes)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: missing data; run: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing chromium (headless browser for the HTML report test)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
    || echo "setup: chromium could not be installed; the HTML browser test will be skipped"
fi

if ! python -c "import varprune, pytest, xdist, hypothesis, scipy, nibabel, monai, timm, PIL, transformers, tokenizers, lightning, ruff, mypy, mkdocs" 2>/dev/null \
   || [ "$(python -c 'import varprune, os; print(os.path.realpath(varprune.__file__))')" != "$(realpath src/varprune/__init__.py)" ]; then
  echo "setup: pip install -e .[test,dev] (takes torch from the local mirror; a few minutes)"
  python -m pip install -q --disable-pip-version-check -e ".[test,dev]"
fi
