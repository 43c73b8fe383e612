#!/usr/bin/env bash
# The prepared GPU suite (issue #14): one command, about 7 minutes on one GPU machine (435 s on an H200 in session
# 12), every step time-boxed (the boxes add up to 505 s).
#
#   bench/gpu-suite.sh [--dry-run] [--out FILE] [--only STEP,STEP...]
#
# Steps: the GPU tests (tests/dit/test_gpu.py and every tests/**/test_*gpu*.py), bench/dit.py (1.3B, 512² and
# 480×832, 1/2/4 steps), bench/pipeline_local.py (1.3B + full Wan VAE at 512² 2 steps and 832×480 1 step, the
# side-by-side configurations; TAEHV both ways at 512² 2 steps), bench/serve.py (the served path in the one-GPU
# deployment: 1 stream, and the streams-per-GPU search at 16 FPS in the fast mode (TAEHV); the two-stage ring on
# the same GPU, 1 stream;
# 14B at 1 step if the GPU has the memory; the served 1.3B/14B use Wan2.1 weights from MODEL_DIR / MODEL_DIR_14B
# when set, else random weights at the real sizes: model.random_weights, real timings, noise output; the
# measurement mode keeps the content markers), bench/official.py (the official StreamDiffusionV2 code side by
# side when OFFICIAL_DIR names a fetched copy, the same two configurations; ratio lines rheo / official).
# Every result is one JSON line appended to FILE (default bench-results/gpu-suite-<utc>.jsonl) with "step" added;
# a step that printed none (crashed, timed out) gets {"step", "error", "rc"}; a summary line ends the run
# (exit status 1 when any step failed).
# --only: just these steps (names as in the result lines), e.g. the served ones alone for a short device call.
# The torch.compile steps run only when --only names them (their compiles would take the whole run past 8 minutes):
# compile_tests (the GPU tests marked slow: compiled DiT pieces and compiled VAE against eager) and vae_compile
# (bench/pipeline_local.py --vae-compile at 512², 2 steps; the row carries its exactness against an eager copy).
# SERVE_LOGS=DIR keeps every service's whole log of each served step in DIR/<step> (bench/serve.py --logs).
# --dry-run: the same steps on CPU with the tiny model and minimal sizes (seconds; CI runs it:
# tests/bench/test_gpu_suite.py). Set PYTHON to choose the interpreter (default: python3).
# On a bare lent GPU machine the served path's packages are missing: bench/gpu-wheels.sh prepares them here
# (its header has the one device command).
set -u
cd "$(dirname "$0")/.."
DRY=0
OUT=""
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) OUT="$2"; shift ;;
        --only) ONLY=",$2,"; shift ;;
        *) echo "usage: $0 [--dry-run] [--out FILE] [--only STEP,STEP...]" >&2; exit 2 ;;
    esac
    shift
done
PY="${PYTHON:-python3}"
STEPS="gpu_tests dit pipeline_local serve serve_ring serve_search_fast serve_14b official compile_tests vae_compile"
OPT_IN="compile_tests vae_compile"  # run only when --only names them: they would take the whole run past 8 minutes
for name in ${ONLY//,/ }; do  # a misspelt step would run nothing and pass
    case " $STEPS " in *" $name "*) ;; *) echo "$0: --only: no step '$name' (steps: $STEPS)" >&2; exit 2 ;; esac
done
OUT="${OUT:-bench-results/gpu-suite-$(date -u +%Y%m%dT%H%M%SZ).jsonl}"
mkdir -p "$(dirname "$OUT")"
: > "$OUT.log"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
export PYTHONUNBUFFERED=1  # a step cut off by its time box keeps the result lines it printed
START=$(date +%s)

wanted() {
    case "$ONLY" in
        *",$1,"*) return 0 ;;
        "") case " $OPT_IN " in *" $1 "*) return 1 ;; *) return 0 ;; esac ;;
        *) return 1 ;;
    esac
}

# step NAME SECONDS CMD...: run CMD under `timeout`; its JSON lines go to $OUT with "step" added.
step() {
    local name="$1" limit="$2"
    shift 2
    wanted "$name" || return 0
    case "$name" in serve*) [ -n "${SERVE_LOGS:-}" ] && set -- "$@" --logs "$SERVE_LOGS/$name" ;; esac
    echo "== $name (≤ ${limit}s): $*" >&2
    local t0 rc lines
    t0=$(date +%s)
    lines=$(timeout --kill-after=10 "$limit" "$@" 2>>"$OUT.log")
    rc=$?
    STEP="$name" RC="$rc" SECS="$(( $(date +%s) - t0 ))" "$PY" -c '
import json, os, sys
name, rc, secs = os.environ["STEP"], int(os.environ["RC"]), int(os.environ["SECS"])
rows = [json.loads(l) for l in sys.stdin.read().splitlines() if l.startswith("{")]
for r in rows:
    print(json.dumps({"step": name, **r, "step_seconds": secs}))
if not rows:
    why = "timed out" if rc in (124, 137) else "no result line"
    print(json.dumps({"step": name, "error": why, "rc": rc, "seconds": secs}))
' <<<"$lines" | tee -a "$OUT"
}

# pytest as one JSON line (its summary and exit code)
pytest_json() {
    local out rc
    # -v into the suite's log as it goes (a time box that cuts pytest off leaves which tests ran, and how long);
    # a per-test limit where pytest-timeout is installed, so that one slow compile cannot hide every traceback
    local limit=()
    "$PY" -c "import pytest_timeout" 2>/dev/null && limit=(--timeout "${GPU_TEST_TIMEOUT:-15}")
    out=$("$PY" -m pytest -v --tb=short -p no:cacheprovider --durations=0 "${limit[@]}" "$@" 2>&1 | tee /dev/stderr
        exit "${PIPESTATUS[0]}")
    rc=$?
    OUTPUT="$out" RC="$rc" "$PY" -c '
import json, os, re
rc, lines = int(os.environ["RC"]), os.environ["OUTPUT"].splitlines()
final = [l for l in lines if re.search(r" in [0-9.]+s", l)]  # pytest ends on "N passed, M failed in Xs"
row = {"bench": "gpu_tests", "rc": rc, "summary": (final or lines or [""])[-1].strip("= "),
       "failed": [l.split()[1] for l in lines if l.startswith("FAILED ")]}
print(json.dumps(row | ({} if rc in (0, 5) else {"error": "tests failed"})))'
}

export -f pytest_json
export PY
# the CUDA tests (tests/deploy's one-GPU chart profile is a CPU test, and its conftest needs helm-python-sdk)
GPU_TESTS=$(find tests -name 'test_*gpu*.py' ! -name 'test_gpu_suite.py' ! -path 'tests/deploy/*' | sort | tr '\n' ' ')
if [ "$DRY" = 1 ]; then  # nothing to measure on CPU: the steps run side by side (half the time on 2 cores)
    step gpu_tests 120 bash -c 'pytest_json "$@"' _ $GPU_TESTS &
    step dit 120 "$PY" bench/dit.py --device cpu --models tiny --steps 1 --streams 1 --iters 1 --warmup 1 &
    step pipeline_local 120 "$PY" bench/pipeline_local.py --device cpu --preset tiny --size 64x64 --steps 1 \
        --streams 1 --frames 13 --threads 1 &
    step serve 60 "$PY" bench/serve.py --dry-run &
    step official 60 "$PY" bench/official.py &
    step compile_tests 60 bash -c 'pytest_json "$@"' _ -m slow $GPU_TESTS &
    step vae_compile 60 "$PY" bench/pipeline_local.py --device cpu --preset tiny --size 64x64 --steps 1 \
        --streams 1 --frames 9 --threads 1 --vae-compile &
    wait
else
    # the slow ones (torch.compile's) are the opt-in compile_tests step's
    step gpu_tests 60 bash -c 'pytest_json "$@"' _ -m "not slow" $GPU_TESTS
    step dit 40 "$PY" bench/dit.py --device cuda --models 1.3b --res 512x512,480x832 --steps 1,2,4 --streams 1
    # the two side-by-side configurations, then the fast mode (TAEHV both ways); CUDA graphs without compile, so
    # that a shape's compile cannot eat a time box (each run builds and captures its own)
    PL=("$PY" bench/pipeline_local.py --device cuda --preset 1.3b --streams 1 --forward graph)
    step pipeline_local 35 "${PL[@]}" --size 512x512 --steps 2
    step pipeline_local 30 "${PL[@]}" --size 832x480 --steps 1
    step pipeline_local 25 "${PL[@]}" --size 512x512 --steps 2 --vae taehv
    # Wan2.1 weights when MODEL_DIR names them, else random weights at the real sizes (model.random_weights).
    # The one-GPU deployment (one stage holding every block: `rheo up --device cuda`) for the per-GPU figures, and
    # the two-stage ring on the same GPU (its tensor link on the CUDA path) for one stream.
    # --start-timeout inside each time box: a stack that does not come up prints every service's log tail; a
    # warm-up stream of 6 chunks takes the first kernels and allocations and captures the steady CUDA graphs (a
    # batch signature is captured the second time it is seen; half the time may go to captures while it runs),
    # which the measured stream replays on the warm-up stream's storage (StatePool); CUDA graphs without
    # torch.compile (bench/dit.py's mode), so that no compile time can eat a time box.
    GRAPH=(--env RHEO_DIT_STAGE__FORWARD=graph)
    WARM=(--warmup 15 --warmup-chunks 6 --env RHEO_DIT_STAGE__CAPTURE_BUDGET=0.5)
    SERVED=(--model 1.3b --random-weights)
    SERVED_14B=(--random-weights)
    if [ -n "${MODEL_DIR:-}" ]; then SERVED=(--model 1.3b --model-dir "$MODEL_DIR"); fi
    if [ -n "${MODEL_DIR_14B:-${MODEL_DIR:-}}" ]; then SERVED_14B=(--model-dir "${MODEL_DIR_14B:-$MODEL_DIR}"); fi
    step serve 55 "$PY" bench/serve.py --device cuda "${SERVED[@]}" "${GRAPH[@]}" --size 512 --fps 16 --steps 2 \
        --stages 1 --streams 1 --seconds 8 --slo-ms 1000 --start-timeout 35 "${WARM[@]}"
    step serve_ring 40 "$PY" bench/serve.py --device cuda "${SERVED[@]}" "${GRAPH[@]}" --size 512 --fps 16 \
        --steps 2 --stages 2 --streams 1 --seconds 5 --slo-ms 1000 --start-timeout 30
    # the streams-per-GPU search in the fast mode (TAEHV both ways): with the eager Wan VAE (≈ 120 ms a chunk) one
    # GPU holds about one 16 FPS stream at 512², which `serve` above measures
    step serve_search_fast 85 "$PY" bench/serve.py --device cuda "${SERVED[@]}" "${GRAPH[@]}" \
        --env RHEO_ENCODER__VAE=taehv --size 512 --fps 16 --steps 2 --stages 1 --search --seconds 5 --slo-ms 1000 \
        --max-streams 8 --start-timeout 35 "${WARM[@]}"
    FREE_MIB=$(nvidia-smi --query-gpu=memory.free --format=csv,noheader,nounits 2>/dev/null | head -n 1)
    if [ "${FREE_MIB:-0}" -gt 60000 ]; then
        step serve_14b 45 "$PY" bench/serve.py --device cuda --model 14b "${SERVED_14B[@]}" "${GRAPH[@]}" \
            --env RHEO_DIT_STAGE__WARM_UP_CHUNKS=0 \
            --size 512 --fps 16 --steps 1 --streams 1 --stages 1 --seconds 5 --slo-ms 2000 --start-timeout 32
    elif wanted serve_14b; then
        echo "{\"step\": \"serve_14b\", \"skipped\": \"needs > 60000 MiB free (${FREE_MIB:-?})\"}" \
            | tee -a "$OUT"
    fi
    # the official code on the same GPU, the two configurations of the pipeline_local rows above: ratio lines
    OFF=("$PY" bench/official.py --rheo-jsonl "$OUT" --frames 41 --warmup-chunks 4)
    step official 40 "${OFF[@]}" --size 512x512 --steps 2
    step official 50 "${OFF[@]}" --size 832x480 --steps 1
    # opt-in (--only compile_tests,vae_compile: a second short call): compiling takes a minute or more per model
    GPU_TEST_TIMEOUT=100 step compile_tests 150 bash -c 'pytest_json "$@"' _ -m slow $GPU_TESTS
    step vae_compile 120 "${PL[@]}" --size 512x512 --steps 2 --vae-compile

fi

SUMMARY=$(SECS=$(( $(date +%s) - START )) DRY="$DRY" "$PY" -c '
import json, os, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
steps = {}
for r in rows:
    s = steps.setdefault(r.get("step", "?"), {"lines": 0, "errors": 0})
    s["lines"] += 1
    s["errors"] += "error" in r
print(json.dumps({"step": "summary", "dry_run": os.environ["DRY"] == "1", "seconds": int(os.environ["SECS"]),
                  "steps": steps, "failed": sorted(k for k, v in steps.items() if v["errors"])}))
' "$OUT")
echo "$SUMMARY" | tee -a "$OUT"
echo "results: $OUT (stderr of the steps: $OUT.log)" >&2
case "$SUMMARY" in *'"failed": []'*) exit 0 ;; *) exit 1 ;; esac
