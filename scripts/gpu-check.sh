#!/usr/bin/env bash
# The GPU checks in one command, for a GPU machine that has PyTorch and nothing of ours installed
# (no pip registry, no database, no optuna): the CUDA tests that need only trainer/
# (tests/trainer/test_cuda.py), then bench/gpu_throughput.py. Everything it prints goes to OUT.
#
#   bash scripts/gpu-check.sh OUT            # from a checkout of this repository; under 8 minutes
#
# Needs python3 (3.11+; $PYTHON to choose another) with torch (2.11 or later, with CUDA),
# torchvision, numpy and scikit-learn: what trainer/ imports. pytest is used when it is there,
# else the test module's own runner (`python tests/trainer/test_cuda.py`). Each part has a time
# limit (tests 195 s, benchmark 270 s) so the whole stays under 8 minutes; a part cut short keeps
# what it printed.
#
# OUT/env.txt      python, the packages and their versions, the GPUs
# OUT/tests.txt    each CUDA test's outcome (OUT/tests.xml too, under pytest)
# OUT/bench.txt    the benchmark's tables and summary line
# OUT/summary.txt  the exit status of each part
set -u
out=${1:?usage: bash scripts/gpu-check.sh OUT_FOLDER}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

"$py" - >"$out/env.txt" 2>&1 <<'EOF'
import importlib
import sys

print("python", sys.version.split()[0])
missing = []
for name in ("torch", "torchvision", "numpy", "sklearn", "PIL", "pytest"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except ImportError:
        print(name, "MISSING")
        missing.append(name)
if "torch" not in missing:
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), gpus)
needed = [m for m in missing if m != "pytest"]
if needed:
    print("cannot run: install", ", ".join(needed))
sys.exit(3 if needed else 0)
EOF
env_rc=$?
cat "$out/env.txt"
if [ "$env_rc" -ne 0 ]; then
    echo "env $env_rc (missing packages: see env.txt)" >"$out/summary.txt"
    exit "$env_rc"
fi

# --noconftest: tests/conftest.py makes PostgreSQL databases (psycopg2, SQLAlchemy); these tests
# need none. -c /dev/null: pyproject's pytest settings name Optuna's warning classes.
if "$py" -c "import pytest" 2>/dev/null; then
    timeout 195 "$py" -m pytest -c /dev/null --rootdir . --noconftest -p no:cacheprovider \
        -o "markers=cuda: needs a CUDA GPU" -m cuda -v -rs --junitxml "$out/tests.xml" \
        tests/trainer/test_cuda.py >"$out/tests.txt" 2>&1
else
    timeout 195 "$py" tests/trainer/test_cuda.py >"$out/tests.txt" 2>&1
fi
tests_rc=$?
tail -n 25 "$out/tests.txt"

timeout 270 "$py" bench/gpu_throughput.py >"$out/bench.txt" 2>&1
bench_rc=$?
cat "$out/bench.txt"

printf 'tests %s\nbench %s\n' "$tests_rc" "$bench_rc" | tee "$out/summary.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
