#!/usr/bin/env bash
# The device check (scripts/gpu_check.py): conversion, calibration and vLLM serving on a GPU, in a few
# minutes, results in gpu_check_results.md. Reduced form on the CPU: --device cpu --tiny (or
# MLAKIT_DEVICE=cpu MLAKIT_TINY=1). PYTHON picks the interpreter (default: python3); when it cannot
# import this checkout as mlakit, the checkout is put first on its path.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
found="$("$python" -c 'import mlakit, os; print(os.path.dirname(os.path.realpath(mlakit.__file__)))' 2>/dev/null || true)"
if [[ "$found" != "$root" ]]; then
    pkg="$(mktemp -d)"
    trap 'rm -rf "$pkg"' EXIT
    ln -s "$root" "$pkg/mlakit"
    export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
fi
args=(--device "${MLAKIT_DEVICE:-cuda}")
if [[ -n "${MLAKIT_TINY:-}" ]]; then args+=(--tiny); fi
"$python" "$root/scripts/gpu_check.py" "${args[@]}" "$@"
