#!/usr/bin/env bash
# One-shot check on a CUDA machine (torch, triton, nvcc, pytest installed; no network needed):
#   1. builds the extension for the local GPU's architecture only, in parallel (skipped when a
#      prebuilt uce_fast/_C for this Python already loads with CUDA kernels);
#   2. runs the whole test suite on the GPU (triton and cuda backends, the >2^31-element tests
#      where memory allows), spread over processes with pytest-xdist when it is installed;
#   3. runs the CUDA benchmarks: the loss (benchmarks/test_cuda_loss.py), the Monte-Carlo
#      pipelines (test_mc_memory.py) and the training-step timing (test_step.py), and renders
#      their README tables;
#   4. writes OUTDIR/summary.json (stage, exit code, seconds, test counts), OUTDIR/summary.txt,
#      and OUTDIR/gpu_check.tar.gz with every log, the JUnit XML, the benchmark JSON/Markdown
#      results, the plots and the README with the tables filled in.
# Each stage has its own time limit, so that the whole stays under 8 minutes on one H200 with
# 16 cores; a stage that fails or runs out of time is recorded and the next one still runs.
#
# Usage: bash scripts/gpu_check.sh OUTDIR
# Environment: PYTHON (default python3), BUILD_LIMIT / TEST_LIMIT / BENCH_LIMIT (seconds),
# TEST_WORKERS (pytest-xdist processes, default 8), TRITON_CACHE_DIR (default .triton-cache in the
# repository, so a cache warmed by scripts/triton_compile_check.py --cache-dir can be carried).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
# Logs go into the tarball; OUTDIR itself holds only the three summary files and the tarball.
logs=$(mktemp -d "${TMPDIR:-/tmp}/uce-gpu-check.XXXXXX")/logs
mkdir -p "$logs" benchmarks/results
py=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
summary=$logs/summary.tsv
: >"$summary"

stage() {  # stage NAME LIMIT_SECONDS CMD...: runs CMD with a limit, logs to logs/NAME.log
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  echo "=== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$logs/$name.log" 2>&1
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >>"$summary"
  tail -n 3 "$logs/$name.log"
  echo "=== $name: exit $rc, $(( $(date +%s) - t0 ))s"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  "$py" -c 'import sys, torch, triton; print(sys.version.split()[0], torch.__version__, torch.version.cuda, triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability(), torch.cuda.get_device_properties(0).multi_processor_count, "SMs")'
  nvcc --version | tail -n 1
  nproc
} >"$logs/machine.log" 2>&1
cat "$logs/machine.log"

has_cuda_kernels() {
  "$py" -c 'import sys, uce_fast.ops as o; sys.exit(0 if "cuda" in o.native_devices() else 1)' \
    >/dev/null 2>&1
}
if has_cuda_kernels; then
  echo "=== build: a prebuilt uce_fast/_C with CUDA kernels loads; not rebuilt"
  printf 'build\t0\t0\n' >>"$summary"
else
  arch=$("$py" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())')
  stage build "${BUILD_LIMIT:-200}" env UCE_FAST_CUDA_ARCHS="$arch" MAX_JOBS="$(nproc)" \
    "$py" setup.py build_ext --inplace
fi
"$py" -c 'import uce_fast, uce_fast.ops as o; print("backends:", uce_fast.available_backends(), "native:", o.native_devices())' \
  2>&1 | tee -a "$logs/machine.log"

workers=()
if "$py" -c 'import xdist' >/dev/null 2>&1; then workers=(-n "${TEST_WORKERS:-8}"); fi
stage tests "${TEST_LIMIT:-210}" "$py" -m pytest tests -q -p no:cacheprovider "${workers[@]}" \
  --junitxml="$logs/tests-junit.xml"

stage bench-loss "${BENCH_LIMIT:-120}" "$py" -m pytest benchmarks/test_cuda_loss.py -q \
  -p no:cacheprovider
stage bench-mc "${BENCH_LIMIT:-120}" "$py" -m pytest benchmarks/test_mc_memory.py -q \
  -p no:cacheprovider -k cuda
stage bench-step "${BENCH_LIMIT:-120}" "$py" -m pytest benchmarks/test_step.py -q \
  -p no:cacheprovider -k cuda
stage render 30 "$py" benchmarks/render.py

"$py" - "$summary" "$logs" "$out" <<'EOF'
import json, re, sys
from pathlib import Path
summary, logs, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
stages = []
for line in summary.read_text().splitlines():
    name, rc, seconds = line.split("\t")
    entry = {"stage": name, "exit": int(rc), "seconds": int(seconds)}
    log = logs / f"{name}.log"
    if log.exists():
        tail = log.read_text(errors="replace")[-4000:]
        for key in ("passed", "failed", "skipped", "error", "errors"):
            found = re.findall(rf"(\d+) {key}\b", tail)
            if found:
                entry[key] = int(found[-1])
    stages.append(entry)
(out / "summary.json").write_text(json.dumps(stages, indent=2))
lines = [f"{s['stage']:<12} exit {s['exit']:>3}  {s['seconds']:>4}s  "
         + " ".join(f"{k} {s[k]}" for k in ("passed", "failed", "skipped", "errors", "error")
                    if k in s) for s in stages]
(out / "summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
tar -czf "$out/gpu_check.tar.gz" -C "$(dirname "$logs")" logs \
  -C "$PWD" benchmarks/results README.md docs 2>/dev/null
echo "results: $out/summary.json, $out/summary.txt, $out/gpu_check.tar.gz"
