#!/usr/bin/env bash
# MamFusion's GPU check, for a lent CUDA machine: run from the repository root.
#
#   scripts/gpu_check.sh [--dry-run] [--python PY] [--workdir DIR] [--wheels DIR] [--offline]
#                        [--system-site-packages] [--budget SECONDS]
#
# 1. environment: a venv (in --workdir, outside the repository) with CUDA torch (torch==2.14.1 from PyPI's
#    default index, which has CUDA wheels on Linux; kept if the venv already has a CUDA torch), the project
#    with its dev extra (`pip install -e`, which also builds the compiled CPU kernels in place), and the
#    `cuda` extra - mamba-ssm and causal-conv1d, with --no-build-isolation (prebuilt wheels where they match);
# 2. the gpu-marked tests (every tests/ file that has `pytest.mark.gpu`), and the compiled selective scan's
#    own tests, whose every vector path this CPU supports (AVX-512 on most GPU hosts) then runs;
# 3. scripts/gpu_check.py's measurements: mamba-ssm's kernels vs our scans (outputs and gradients, against
#    a float64 reference, plus fwd+bwd times and the compiled scan's thread scaling); bf16-autocast vs fp32
#    loss parity on a TVR-preset batch; a TVR-preset training epoch on synthetic features; paper-profile
#    extraction (ResNet-152 + I3D-R50, random-init weights) on synthetic decoded frames.
# It prints one Markdown table (also written to DIR/gpu_check.md; every step's log is in DIR/logs). Every
# step runs under `timeout`, within a total budget (default 465 s, so the whole script ends inside 8
# minutes): a step that fails, times out or finds no time left becomes a row saying so, and the rest run.
#
# --dry-run checks the script itself where there is no GPU: no environment is built (PY, default
# .venv/bin/python, is used as it is), the gpu tests skip, and the measurements run on CPU at tiny sizes.
# --wheels DIR adds a local directory of wheels/sdists to every pip install (--offline: nothing else), for
# machines without network; --system-site-packages lets the venv see a preinstalled CUDA torch. The project
# needs Python 3.11 (--python picks the interpreter the venv is made from; default python3.11, else python3).
set -uo pipefail

DRY_RUN=0
PY_ARG=""
WORK="${TMPDIR:-/tmp}/mamfusion-gpu-check"
WHEELS=""
OFFLINE=0
SYSTEM_SITE=0
BUDGET=465

usage() { sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'; }
while (($#)); do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --python) PY_ARG="$2"; shift ;;
        --workdir) WORK="$2"; shift ;;
        --wheels) WHEELS="$2"; shift ;;
        --offline) OFFLINE=1 ;;
        --system-site-packages) SYSTEM_SITE=1 ;;
        --budget) BUDGET="$2"; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done
if [[ ! -f pyproject.toml || ! -f models/selective_scan.py ]]; then
    echo "gpu_check.sh: run it from the repository root" >&2
    exit 2
fi
mkdir -p "$WORK/logs"
WORK="$(cd "$WORK" && pwd)"
START=$SECONDS
ROWS=()

remaining() { echo $((BUDGET - (SECONDS - START))); }

# add_row STEP STATUS SECONDS TEXT
add_row() {
    local text="${4//|/\\|}"
    ROWS+=("| $1 | $2 | $3 | ${text//$'\n'/ } |")
}

# run_step NAME BUDGET RESERVE CMD...: CMD under `timeout` for min(BUDGET, time left - RESERVE) seconds
# (RESERVE: what the steps after it need at least), its output in logs/NAME.log, then one row: the status
# and text of its last `RESULT <status> <text>` line, else its exit status and last output line. Returns 0
# unless the step failed.
run_step() {
    local name=$1 budget=$2 reserve=$3
    shift 3
    local left=$(($(remaining) - reserve))
    local limit=$((budget < left ? budget : left))
    if ((limit < 5)); then
        add_row "$name" skip 0 "no time left in the ${BUDGET} s budget"
        return 1
    fi
    local log="$WORK/logs/$name.log" t0=$SECONDS rc line status text
    timeout --kill-after=5 "$limit" "$@" >"$log" 2>&1 </dev/null
    rc=$?
    line=$(grep -a '^RESULT ' "$log" | tail -n 1)
    if [[ -n $line ]]; then
        line=${line#RESULT }
        status=${line%% *}
        text=${line#* }
    else # pip's and pytest's error lines say more than whatever came last
        status=ok
        text=$(grep -a '^ERROR' "$log" | tail -n 1 | cut -c1-300)
        [[ -n $text ]] || text=$(grep -av '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-300)
        [[ -n $text ]] || text="done"
    fi
    if ((rc == 124 || rc == 137)); then
        status=fail
        text="timed out after ${limit} s (log: logs/$name.log); last output: $text"
    elif ((rc != 0)) && [[ $status != fail ]]; then
        status=fail
        text="exit status $rc (log: logs/$name.log): $text"
    fi
    add_row "$name" "$status" $((SECONDS - t0)) "$text"
    [[ $status != fail ]]
}

# ------------------------------------------------------------------------------------------ environment
PIP_OPTS="--disable-pip-version-check --no-input -q"
[[ -n $WHEELS ]] && PIP_OPTS+=" --find-links $(cd "$WHEELS" && pwd)"
((OFFLINE)) && PIP_OPTS+=" --no-index"
MEASURE_RESERVE=210 # the least the test and measurement steps below need, together

if ((DRY_RUN)); then
    PY="${PY_ARG:-.venv/bin/python}"
    [[ -x $PY ]] || PY=python3
    add_row environment skip 0 "dry run: $PY as it is ($("$PY" --version 2>&1))"
else
    VENV="$WORK/venv"
    BASE_PY="${PY_ARG:-$(command -v python3.11 || command -v python3)}"
    if [[ ! -x $VENV/bin/python ]]; then
        venv_opts=()
        ((SYSTEM_SITE)) && venv_opts+=(--system-site-packages)
        run_step venv 30 "$MEASURE_RESERVE" "$BASE_PY" -m venv "${venv_opts[@]}" "$VENV"
    fi
    PY="$VENV/bin/python"
    if "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
        add_row torch ok 0 "already in the venv: $("$PY" -c 'import torch; print(torch.__version__)')"
    else
        # shellcheck disable=SC2086 # PIP_OPTS is a list of words
        run_step torch 150 "$MEASURE_RESERVE" "$PY" -m pip install $PIP_OPTS "torch==2.14.1"
    fi
    build_isolation=()
    "$PY" -c "import setuptools" 2>/dev/null && build_isolation=(--no-build-isolation)
    # shellcheck disable=SC2086
    run_step project 120 "$MEASURE_RESERVE" "$PY" -m pip install $PIP_OPTS "${build_isolation[@]}" -e ".[dev]"
    # --no-deps: mamba-ssm's own dependency list pulls tilelang, quack-kernels and more that its scan does not
    # use. Their setup.py first fetches a prebuilt wheel for this torch from GitHub, and compiles only if there
    # is none (long: the step may time out, and is then a failed row); offline, that fetch would crash the
    # build, so it is skipped. A prebuilt wheel in --wheels DIR is used as it is.
    arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null)
    export TORCH_CUDA_ARCH_LIST="${arch:-9.0}" MAX_JOBS="$(nproc)" PY PIP_OPTS
    ((OFFLINE)) && export MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE
    cuda_extra() {
        # shellcheck disable=SC2086
        "$PY" -m pip install $PIP_OPTS einops ninja packaging &&
            "$PY" -m pip install $PIP_OPTS --no-build-isolation --no-deps "causal-conv1d>=1.3" "mamba-ssm>=2.2.1" &&
            "$PY" -c "
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
import causal_conv1d, mamba_ssm
print('RESULT ok mamba_ssm', mamba_ssm.__version__, '+ causal_conv1d', causal_conv1d.__version__, 'import')"
    }
    export -f cuda_extra
    run_step cuda-extra 200 "$MEASURE_RESERVE" bash -c cuda_extra
fi
timeout 60 "$PY" - >"$WORK/logs/kernels.log" 2>&1 <<'EOF'
from models.selective_scan import compiled_paths
print("RESULT", "ok" if compiled_paths() else "fail", "compiled selective scan paths:", compiled_paths() or "not built")
EOF
line=$(grep -a '^RESULT ' "$WORK/logs/kernels.log" | tail -n 1)
if [[ -n $line ]]; then
    line=${line#RESULT }
    add_row cpu-kernel "${line%% *}" 0 "${line#* }"
else
    add_row cpu-kernel fail 0 "could not import the project with $PY (log: logs/kernels.log)"
fi

# ------------------------------------------------------------------------------------------------ tests
mapfile -t GPU_FILES < <(grep -rl "pytest.mark.gpu" tests/ | sort)
run_step gpu-tests 120 165 "$PY" -m pytest -q -m gpu -p no:cacheprovider "${GPU_FILES[@]}"
run_step cpu-kernel-tests 60 135 "$PY" -m pytest -q -p no:cacheprovider tests/test_selective_scan_ext.py

# ----------------------------------------------------------------------------------------- measurements
DRY=()
((DRY_RUN)) && DRY=(--dry-run)
run_step compare 60 105 "$PY" scripts/gpu_check.py compare "${DRY[@]}"
run_step amp 45 75 "$PY" scripts/gpu_check.py amp "${DRY[@]}"
run_step epoch 75 30 "$PY" scripts/gpu_check.py epoch "${DRY[@]}"
run_step extract 60 0 "$PY" scripts/gpu_check.py extract "${DRY[@]}"

# ---------------------------------------------------------------------------------------------- report
gpu=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -n 1)
versions=$("$PY" -c "import sys, torch; print(f'Python {sys.version.split()[0]}, torch {torch.__version__}')" 2>/dev/null ||
    echo "no working torch in $PY")
{
    echo "## MamFusion GPU check$( ((DRY_RUN)) && echo ' (dry run, CPU)')"
    echo
    echo "$(date -u +%Y-%m-%dT%H:%MZ); ${gpu:-no GPU}; $versions; $((SECONDS - START)) s of a ${BUDGET} s budget"
    echo
    echo "| step | status | s | result |"
    echo "|---|---|---:|---|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$WORK/gpu_check.md"
