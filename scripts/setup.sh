#!/usr/bin/env bash
# Set up codex-ml in ./.venv from nothing but Python 3.10+ and pip.
#   bash scripts/setup.sh          the package and its runtime dependencies
#   bash scripts/setup.sh --dev    plus the test and lint tools, and Chromium for the report tests
# PyTorch is pinned to 2.13.0 and installed first: on a CPU machine pip then keeps that build instead
# of pulling a multi-GB CUDA build (where PyPI's default wheel is a CUDA one, set TORCH_INDEX to
# https://download.pytorch.org/whl/cpu). GPU users: TORCH_INDEX=https://download.pytorch.org/whl/cu128.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dev=0; [[ ${1:-} == --dev ]] && dev=1

[[ -x .venv/bin/python ]] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
if [[ -n ${TORCH_INDEX:-} ]]; then
  pip install -q torch==2.13.0 --index-url "$TORCH_INDEX"
else
  pip install -q torch==2.13.0
fi
# Exactly the versions of requirements.lock, then the package itself on top.
pip install -q -r requirements.lock
pip install -q --no-deps -e .
# bubblewrap isolates the generated programs that HumanEval judging runs (docs/sandbox.md). Without it the
# sandbox falls back to weaker mechanisms and says so on every run.
if ! command -v bwrap >/dev/null 2>&1; then
  sudo=""; [[ $(id -u) != 0 ]] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && sudo="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && [[ $(id -u) == 0 || -n $sudo ]]; then
    ($sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq bubblewrap >/dev/null) \
      || echo "warning: could not install bubblewrap; the HumanEval sandbox will be weaker and say so" >&2
  else
    echo "warning: bubblewrap (bwrap) is not installed: install it (apt-get install bubblewrap, dnf install bubblewrap)" \
         "for the full HumanEval sandbox; without it the sandbox is weaker and says so" >&2
  fi
fi
if [[ $dev == 1 ]]; then
  # Debian's Chromium renders the HTML reports in the tracking tests, driven by Playwright (the dev extra)
  # through executable_path: never `playwright install`, no browser is downloaded.
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; the report rendering tests will fail" >&2
  fi
fi
.venv/bin/codex-ml --help > /dev/null
echo "codex-ml is installed in .venv: source .venv/bin/activate"
