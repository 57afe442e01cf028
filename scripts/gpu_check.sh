#!/usr/bin/env bash
# The GPU check: the runtime on ONNX Runtime's CUDA execution provider, against the CPU.
#
#   bash scripts/gpu_check.sh OUT.json [--shape switch-base-8|tiny] [--work DIR] [--venv DIR]
#                                      [--wheels DIR] [--time-limit SECONDS] [--rehearsal] [--quick]
#
# On a machine with an NVIDIA GPU (nvidia-smi lists one) it builds a random-weight
# switch-base-8 (float16 dense graphs and experts, int4 MatMulNBits ladder copies), then runs
# scripts/gpu_check.py: tokens and router logits on CUDA against the CPU (full, and the ladder at
# 33%), decode ms/token for full / ladder / prune / on-demand at 33%, and each GPU cell's memory
# per nvidia-smi against its budget; every figure goes to OUT.json. At most 8 minutes in all
# (--time-limit, default 480, covers the install too).
#
# Python: $PYTHON, else python3, when its onnxruntime offers CUDAExecutionProvider; else a venv of
# the check's own (--venv, default ~/.cache/swapmoe-gpu-check/venv) that sees the calling
# python3's packages and gets onnxruntime-gpu from PyPI, or from --wheels DIR (pip --no-index)
# on a machine without a package index (a wheel may sit there in parts, X.whl.part-aa, ...: split -b,
# joined in name order). The repository runs from its checkout (PYTHONPATH).
#
# Without a GPU it checks its arguments, says that there is no CUDA here, and exits 0; nothing is
# written. --rehearsal runs every step on the CPU provider instead (to test the script itself;
# its JSON says REHEARSAL and holds no GPU figure). --quick: fewer and shorter requests (1 greedy,
# 2 timed, 4 tokens; for tests). Exit status: 0 done (or no GPU), 1 a step
# failed (the JSON says which), 2 bad arguments.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
USAGE="usage: scripts/gpu_check.sh OUT.json [--shape switch-base-8|tiny] [--work DIR] [--venv DIR] [--wheels DIR] [--time-limit SECONDS] [--rehearsal] [--quick]"
die() { echo "gpu_check.sh: error: $*" >&2; echo "$USAGE" >&2; exit 2; }
say() { echo "[gpu_check] $*"; }

OUT="" SHAPE="switch-base-8" WORK="" VENV="${XDG_CACHE_HOME:-$HOME/.cache}/swapmoe-gpu-check/venv" WHEELS="" LIMIT=480 REHEARSAL=0 QUICK=0
while (($#)); do
    case "$1" in
        -h|--help) sed -n '2,/^set /p' "${BASH_SOURCE[0]}" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
        --shape|--work|--venv|--wheels|--time-limit)
            (($# >= 2)) || die "$1 needs a value"
            case "$1" in
                --shape) SHAPE=$2 ;; --work) WORK=$2 ;; --venv) VENV=$2 ;; --wheels) WHEELS=$2 ;; --time-limit) LIMIT=$2 ;;
            esac
            shift 2 ;;
        --rehearsal) REHEARSAL=1; shift ;;
        --quick) QUICK=1; shift ;;
        -*) die "unknown option $1" ;;
        *) [[ -z $OUT ]] || die "one output path only (got $OUT and $1)"; OUT=$1; shift ;;
    esac
done
[[ -n $OUT ]] || die "the JSON output path is required"
[[ $OUT == *.json ]] || die "the output must be a .json file, not '$OUT'"
OUT_DIR=$(dirname -- "$OUT")
[[ -d $OUT_DIR ]] || die "the output's folder '$OUT_DIR' does not exist"
[[ -w $OUT_DIR ]] || die "the output's folder '$OUT_DIR' is not writable"
case "$SHAPE" in switch-base-8|tiny) ;; *) die "--shape must be switch-base-8 or tiny, not '$SHAPE'" ;; esac
[[ $LIMIT =~ ^[0-9]+$ ]] && ((LIMIT >= 60 && LIMIT <= 480)) || die "--time-limit must be whole seconds from 60 to 480, not '$LIMIT'"
[[ -z $WHEELS || -d $WHEELS ]] || die "--wheels '$WHEELS' is not a folder"
if [[ -n $WORK && -e $WORK && ! -d $WORK ]]; then die "--work '$WORK' is not a folder"; fi
T0=$SECONDS

SMI=${NVIDIA_SMI:-nvidia-smi}
if ((!REHEARSAL)); then
    if ! command -v "$SMI" >/dev/null 2>&1; then
        say "no CUDA on this machine: $SMI was not found. Nothing was run; the GPU path stays untested."
        exit 0
    fi
    GPUS=$("$SMI" -L 2>/dev/null | grep -c '^GPU ' || true)
    if ((GPUS == 0)); then
        say "no CUDA on this machine: $SMI lists no GPU. Nothing was run; the GPU path stays untested."
        exit 0
    fi
    say "GPU: $("$SMI" --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
fi

has_cuda_ep() {  # python: its onnxruntime offers the CUDA provider and the runtime's own needs import
    "$1" - <<'PY' 2>/dev/null
import sys
import onnxruntime as o
import numpy, psutil, click, tokenizers, onnx, safetensors  # noqa: F401 (the runtime's and export's needs)
sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)
PY
}

PY=""
if ((REHEARSAL)); then
    PY=${PYTHON:-python3}
else
    for cand in "${PYTHON:-}" python3 "$VENV/bin/python"; do
        [[ -n $cand ]] && command -v "$cand" >/dev/null 2>&1 || continue
        if has_cuda_ep "$cand"; then PY=$cand; say "python: $cand (its onnxruntime offers CUDAExecutionProvider)"; break; fi
    done
    if [[ -z $PY ]]; then
        BASE=${PYTHON:-python3}
        command -v "$BASE" >/dev/null 2>&1 || { say "FAIL: no python3 to build the venv from"; exit 1; }
        if [[ ! -x $VENV/bin/python ]]; then
            say "venv: $BASE -m venv $VENV"
            "$BASE" -m venv "$VENV" || { say "FAIL: could not make the venv $VENV"; exit 1; }
        fi
        # The venv sees the calling python's packages after its own (a .pth file), so its
        # onnxruntime-gpu comes first and numpy, onnx, ... need not be installed again.
        # (--system-site-packages would show the base interpreter's, not a venv's such as /opt/...)
        SITE=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "$BASE" -c 'import site, sysconfig; print("\n".join(dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"], *site.getsitepackages()])))' \
            > "$SITE/gpu_check_outer.pth"
        FROM=()
        if [[ -n $WHEELS ]]; then
            FROM=(--no-index --find-links "$WHEELS")
            # A wheel larger than what one transfer carries may come in parts (split -b ... X.whl X.whl.part-):
            # joined here, in name order, next to the venv.
            shopt -s nullglob
            PARTS=("$WHEELS"/*.whl.part-*)
            if ((${#PARTS[@]})); then
                JOINED="$VENV.wheels"
                mkdir -p "$JOINED"
                for whl in $(printf '%s\n' "${PARTS[@]}" | sed 's/\.part-[^/]*$//' | sort -u); do
                    say "joining $(basename "$whl") from its parts"
                    cat "$whl".part-* > "$JOINED/$(basename "$whl")" || { say "FAIL: could not join $whl"; exit 1; }
                done
                FROM+=(--find-links "$JOINED")
            fi
            shopt -u nullglob
        fi
        say "pip install onnxruntime-gpu ${FROM[*]:+(${FROM[*]})}"
        if ! "$VENV/bin/python" -m pip install -q "${FROM[@]}" onnxruntime-gpu; then
            say "FAIL: could not install onnxruntime-gpu into $VENV. Without a package index, download its wheel"
            say "      (and the wheels of what it needs that this python lacks) on a machine with one and pass --wheels DIR."
            exit 1
        fi
        MISSING=$("$VENV/bin/python" -c '
import importlib.util as u
need = {"numpy": "numpy", "psutil": "psutil", "click": "click", "tokenizers": "tokenizers", "onnx": "onnx", "safetensors": "safetensors"}
print(" ".join(p for m, p in need.items() if u.find_spec(m) is None))')
        if [[ -n $MISSING ]]; then
            say "pip install $MISSING"
            "$VENV/bin/python" -m pip install -q "${FROM[@]}" $MISSING || { say "FAIL: could not install $MISSING"; exit 1; }
        fi
        has_cuda_ep "$VENV/bin/python" || {
            say "FAIL: $VENV/bin/python still offers no CUDAExecutionProvider:"
            "$VENV/bin/python" -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())'
            exit 1; }
        PY="$VENV/bin/python"
        say "python: $PY"
    fi
fi

WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")}
mkdir -p "$WORK" || die "cannot make the work folder '$WORK'"
LEFT=$((LIMIT - (SECONDS - T0)))
((LEFT >= 60)) || { say "FAIL: the install took $((SECONDS - T0)) s; under a minute is left"; exit 1; }
ARGS=(run --out "$OUT" --shape "$SHAPE" --work "$WORK" --time-limit $((LEFT - 10)))
((REHEARSAL)) && ARGS+=(--rehearsal)
((QUICK)) && ARGS+=(--greedy 1 --timed 2 --tokens 4)
say "run: $PY scripts/gpu_check.py ${ARGS[*]}"
cd "$REPO" || exit 1
PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" timeout --kill-after=10 "$((LEFT - 2))" "$PY" "$HERE/gpu_check.py" "${ARGS[@]}"
RC=$?
((RC == 124 || RC == 137)) && say "FAIL: stopped at the time limit; $OUT holds what was done"
say "done in $((SECONDS - T0)) s (exit $RC); figures in $OUT"
exit $RC
