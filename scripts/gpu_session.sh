#!/usr/bin/env bash
# One prepared GPU session (about 8 minutes on one H100/H200): the GPU-only kernel tests, bench_kernels at
# full scale with its tile sweep, bench_shard decode and prefill. Run from the repo root of a fresh copy on a
# machine with jax 0.11.2 + CUDA (no registry needed): it installs the wheels carried in .whl/ (made here
# by scripts/gpu_wheels.sh: flax 0.12.12, tokamax 0.0.17 and their missing dependencies) into /tmp/site.
#
#   COMMIT=$(git rev-parse HEAD) OUT=/some/dir bash scripts/gpu_session.sh
#
# Writes under $OUT (at most 7 files): env.txt, pytest.log, pytest.xml, bench_kernels.jsonl,
# bench_shard_decode.json, bench_shard_prefill.json, session.log. Each stage has its own time limit and a
# failing stage does not stop the next. Stage limits (seconds) can be changed: T_TESTS, T_KERNELS (hard
# stop; BUDGET_KERNELS = when bench_kernels stops starting rows), T_SHARD. Extra bench_shard arguments:
# SHARD_DECODE_ARGS, SHARD_PREFILL_ARGS. SESSION_PLATFORM=cpu dry-runs the plumbing here (every stage skips or refuses).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:?set OUT to the folder the results go to}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
T_TESTS="${T_TESTS:-120}" T_KERNELS="${T_KERNELS:-190}" BUDGET_KERNELS="${BUDGET_KERNELS:-140}" T_SHARD="${T_SHARD:-75}"
COMMIT="${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
log() { echo "[gpu_session $(date +%H:%M:%S)] $*" | tee -a "$OUT/session.log"; }

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >>"$OUT/session.log" 2>&1 && export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" \
    || log "wheel install failed (see session.log): continuing with the machine's packages"
else
  log "no .whl/ carried: using the machine's packages (flax < 0.12.12 fails on jax 0.11.2; tokamax rows skip)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export JAX_PLATFORMS="${SESSION_PLATFORM:-cuda}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  "$PY" - <<'EOF' 2>&1
import importlib, jax
print("jax", jax.__version__, jax.devices(), "cores", getattr(jax.devices()[0], "core_count", None))
for name in ("jaxlib", "flax", "tokamax", "numpy", "ml_dtypes"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
EOF
  echo "commit $COMMIT"; } >"$OUT/env.txt"
cat "$OUT/env.txt"

log "stage 1: GPU-only kernel tests (${T_TESTS}s)"
timeout "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider -k gpu --junitxml="$OUT/pytest.xml" \
  tests/test_flash_mla.py tests/test_fp8_gemm.py tests/test_mla_prefill.py tests/test_mla_decode.py \
  tests/test_grouped_gemm.py >"$OUT/pytest.log" 2>&1
log "tests exit $? : $(tail -1 "$OUT/pytest.log")"

log "stage 2: bench_kernels full scale + tile sweep (${T_KERNELS}s, rows started until ${BUDGET_KERNELS}s)"
timeout "$T_KERNELS" "$PY" scripts/bench_kernels.py --scale full --sweep --json --commit "$COMMIT" \
  --budget-s "$BUDGET_KERNELS" >"$OUT/bench_kernels.jsonl" 2>>"$OUT/session.log"
log "bench_kernels exit $?"

for phase in decode prefill; do
  log "stage 3: bench_shard --phase $phase (${T_SHARD}s)"
  extra_var="SHARD_$(echo "$phase" | tr a-z A-Z)_ARGS"
  # shellcheck disable=SC2086
  timeout "$T_SHARD" "$PY" scripts/bench_shard.py --phase "$phase" --json --steps 3 ${!extra_var:-} \
    >"$OUT/bench_shard_$phase.json" 2>>"$OUT/session.log"
  log "bench_shard $phase exit $?"
done

log "summary"
"$PY" - "$OUT" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "bench_kernels.jsonl").read_text().splitlines() if l.startswith("{")] \
    if (out / "bench_kernels.jsonl").exists() else []
for r in rows:
    if r.get("kind") == "row":
        if r["status"] == "ok":
            err = r.get("err_rel")
            print(f"{r['case'][:40]:<40} {r['impl'][:40]:<40} {r['ms']:9.3f} ms {r['tflops']:7.1f} TFLOP/s "
                  f"{r['tbps']:5.2f} TB/s err {err if err is None else f'{err:.1e}'}")
        else:
            print(f"{r['case'][:40]:<40} {r['impl'][:40]:<40} {r['status']}: {r.get('reason', '')[:80]}")
for phase in ("decode", "prefill"):
    f = out / f"bench_shard_{phase}.json"
    try:
        r = json.loads(f.read_text())
        print(f"bench_shard {phase}: {r['step_ms']:.1f} ms/step, {r['tokens_per_s_per_gpu']:.0f} tok/s/GPU, "
              f"kernels {r.get('kernels')}")
    except Exception as e:
        print(f"bench_shard {phase}: no result ({type(e).__name__})")
EOF
