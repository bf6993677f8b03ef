# Sourced by .ci/demo, .ci/test and .ci/run: make (once) and activate the project's virtual
# environment, with the CPU build of torch pinned (an unpinned torch pulls a multi-GB CUDA
# build) and the engine installed with its test and development extras.
#
#   HRPQCT_VENV      where the environment lives (default: .venv in the repository)
#   HRPQCT_FRESH=1   delete it first and install from scratch (what CI does)
#   HRPQCT_INSTALL   "editable" (default: your edits take effect at once) or "wheel" (a
#                    regular install, so packaging mistakes such as missing data files fail)
#   PYTHON           the interpreter to make it with (default: python3; 3.10 to 3.12)
set -euo pipefail
HRPQCT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HRPQCT_VENV="${HRPQCT_VENV:-$HRPQCT_ROOT/.venv}"
HRPQCT_TORCH="torch==2.13.0"

_hrpqct_stamp() {  # what the environment was made from: changes when the requirements do
    { echo "$HRPQCT_TORCH ${HRPQCT_INSTALL:-editable}"; cat "$HRPQCT_ROOT/pyproject.toml"; } \
        | sha256sum | cut -d' ' -f1
}

if [[ "${HRPQCT_FRESH:-0}" == 1 ]]; then
    rm -rf "$HRPQCT_VENV"
fi
if [[ ! -f "$HRPQCT_VENV/.hrpqct-stamp" || "$(cat "$HRPQCT_VENV/.hrpqct-stamp")" != "$(_hrpqct_stamp)" ]]; then
    echo "== setting up $HRPQCT_VENV (first use, or pyproject.toml changed; a few minutes)"
    "${PYTHON:-python3}" -m venv "$HRPQCT_VENV"
    "$HRPQCT_VENV/bin/python" -m pip install --quiet --upgrade pip
    "$HRPQCT_VENV/bin/python" -m pip install --quiet "$HRPQCT_TORCH"
    if [[ "${HRPQCT_INSTALL:-editable}" == wheel ]]; then
        "$HRPQCT_VENV/bin/python" -m pip install --quiet "$HRPQCT_ROOT[dev]"
    else
        "$HRPQCT_VENV/bin/python" -m pip install --quiet -e "$HRPQCT_ROOT[dev]"
    fi
    _hrpqct_stamp > "$HRPQCT_VENV/.hrpqct-stamp"
fi
# shellcheck disable=SC1091
source "$HRPQCT_VENV/bin/activate"
