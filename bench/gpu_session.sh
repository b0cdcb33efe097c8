#!/usr/bin/env bash
# normbench's GPU checks, prepared for a lent GPU (the device tool's `run`, from the checkout's
# root there), in parts that can share one call:
#
#   bash bench/gpu_session.sh wheels           # HERE, before the first call: .whl/ and gpu_data/MNIST/raw
#   bash bench/gpu_session.sh tests check      # THERE: pytest -m gpu beside check.sh (correctness only)
#   bash bench/gpu_session.sh bench            # THERE: normbench bench's GPU section, on a quiet GPU
#
# Parts:
#   wheels  (run here) download the wheels the device's image lacks (jsonargparse with its
#           signatures extra, pytest-xdist) into .whl/ for the device's Python 3.12, copy real MNIST's
#           .gz files (11 MiB) from ../shared/data into gpu_data/MNIST/raw and ../shared/gpu/check.sh
#           to ./check.sh (all git-ignored; ../shared does not travel). Each call there then carries
#           them: carry [".whl", "gpu_data", "check.sh"]. Not data/MNIST/raw: torchvision extracts
#           the files there (55 MiB more), past the device tool's 64 MiB carry limit.
#   tests   pytest -m gpu (tests/test_gpu.py: the captured step per norm against eager, the
#           diagnostics under CUDA-graph replays, DDP on cuDNN, the CPU's batches on CUDA),
#           in the background beside `check`.
#   check   ./check.sh fake . (from `wheels`), with BUDGET_S (default 330).
#   bench   normbench bench --sections [runs,step,pack] --repeats 2 with real MNIST: whole
#           process against the study's loop at 10,000 images, the steady-state step (with
#           reduce-overhead), packed K=5 against sequential. Timings: run it alone. BENCH_ARGS:
#           more arguments of normbench bench (e.g. "--batch_sizes [2]").
#
# Logs and the bench's JSON go to $OUT (the device tool brings them back), else to ./gpu_out.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

setup() {  # there: the carried wheels, then the checkout's own package first on the path
  if [ -d .whl ]; then
    "$PY" -m pip install -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "gpu_session: cannot install .whl" >&2; exit 2; }
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHON="$PY" PYTHONUNBUFFERED=1
  "$PY" -c "import torch, lightning, jsonargparse; print('gpu_session: torch', torch.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')" \
    || { echo "gpu_session: the imports failed; carry .whl (bash bench/gpu_session.sh wheels, here)" >&2; exit 2; }
}

wheels() {  # here
  local specs=()
  # pytest-xdist and execnet: pyproject.toml's addopts name -n, which pytest refuses without them.
  for name in jsonargparse docstring-parser typeshed-client pytest-xdist execnet; do
    specs+=("$name==$(python -m pip show "$name" 2>/dev/null | awk '/^Version:/ {print $2}')")
  done
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "${specs[@]}" || exit 2
  mkdir -p gpu_data/MNIST/raw && cp -n ../shared/data/MNIST/raw/*.gz gpu_data/MNIST/raw/
  cp ../shared/gpu/check.sh check.sh
  ls .whl gpu_data/MNIST/raw check.sh
  local mib; mib=$(du -cm .whl gpu_data check.sh | awk 'END {print $1}')
  echo "gpu_session: carry [\".whl\", \"gpu_data\", \"check.sh\"]: $mib MiB of the device tool's 64"
  [ "$mib" -lt 64 ] || { echo "gpu_session: $mib MiB is past the 64 MiB carry limit: empty .whl/ and gpu_data/, run wheels again" >&2; exit 2; }
  grep -qx '/.whl/' .gitignore || echo "gpu_session: add /.whl/ to .git/info/exclude" >&2
}

tests_start() {
  # -n 0: one process, one GPU; the tests' timings and captures are not shared with another worker.
  "$PY" -m pytest -m gpu -n 0 -q -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest_gpu.log" 2>&1 &
  TESTS_PID=$!
}

check() {
  [ -f check.sh ] || { echo "gpu_session: no ./check.sh: run the wheels part here and carry check.sh" >&2; return 2; }
  BUDGET_S=${BUDGET_S:-330} bash check.sh fake . > "$OUT/check_table.txt" 2> "$OUT/check.log"
  cat "$OUT/check_table.txt"
  local logs; logs=$(awk '/^total .* logs: / {print $NF}' "$OUT/check_table.txt")
  if [ -n "$logs" ] && [ -f "$logs/ddp_1dev.log" ]; then  # DDP's reducer on cuDNN's gradients
    echo "ddp_1dev 'Grad strides do not match': $(grep -c 'Grad strides do not match' "$logs/ddp_1dev.log") lines"
    cp "$logs/ddp_1dev.log" "$OUT/"
  fi
}

bench() {
  "$PY" -m normbench bench --data_dir /tmp/nb_bench_data --mnist_raw gpu_data/MNIST/raw \
    --sections '[runs, step, pack]' --repeats 2 --output "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" \
    | grep -v -E '^(INFO|Seed set|GPU available|TPU available|💡)'
}

[ $# -gt 0 ] || { sed -n "2,/^# Logs/p" "$0"; exit 2; }
if [ "$*" = wheels ]; then wheels; exit; fi
setup
TESTS_PID=
for part in "$@"; do
  case $part in
    tests) tests_start ;;
    check) check ;;
    bench) bench ;;
    *) echo "gpu_session: unknown part '$part' (wheels, tests, check, bench)" >&2; exit 2 ;;
  esac
done
if [ -n "$TESTS_PID" ]; then
  wait "$TESTS_PID"; rc=$?
  echo "pytest -m gpu (rc $rc):"; tail -n 25 "$OUT/pytest_gpu.log"
fi
