#!/usr/bin/env bash
# Every GPU check in one call (well under 8 minutes on an H200): the `gpu` tests, the kernel benchmark
# and the 7B-shape decode benchmark; JSON under $OUT, a short table printed last.
# Runs with the machine's own python3 (torch + CuPy), the repository on PYTHONPATH, nothing installed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/loraplex-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUPY_CACHE_DIR="$OUT/cupy-cache"
PY="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout 300 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/kernels --junitxml "$OUT/gpu-tests.xml"
tests_rc=$?
timeout 120 "$PY" benchmarks/kernels_gpu.py --json "$OUT/kernels.json"
kernels_rc=$?
timeout 240 "$PY" benchmarks/gpu_decode.py --json "$OUT/decode.json"
decode_rc=$?

"$PY" - "$OUT" "$tests_rc" "$kernels_rc" "$decode_rc" <<'PYEOF'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
out, rcs = Path(sys.argv[1]), sys.argv[2:]
print("\n==== loraplex GPU check ====")
try:
    root = ET.parse(out / "gpu-tests.xml").getroot()
    suite = root.find("testsuite")
    a = (suite if suite is not None else root).attrib
    print(f"gpu tests: {a.get('tests')} run, {a.get('failures')} failed, {a.get('errors')} errors, {a.get('skipped')} skipped (rc {rcs[0]})")
except Exception as exc:
    print(f"gpu tests: no report ({exc}) rc {rcs[0]}")
try:
    k = json.loads((out / "kernels.json").read_text())
    print(f"copy bandwidth {k['copy_gbs']} GB/s")
    print(f"{'case':36} {'us':>9} {'GB/s':>8} {'%copy':>6} {'xbmm':>7} {'xloop':>7}")
    for c in k["cases"]:
        print(f"{c['case']:36} {c['kernel_us']:>9} {c['kernel_gbs']:>8} {c['pct_of_copy']:>6} {c['x_gather_bmm']:>7} {c['x_loop']:>7}")
except Exception as exc:
    print(f"kernel benchmark: no result ({exc}) rc {rcs[1]}")
try:
    d = json.loads((out / "decode.json").read_text())
    print(f"decode 7B shapes, batch {d['batch']}: base step {d['base_step_ms']} ms; "
          f"64 x r8 qkvo {d['b_throughput_ratio']} x base (target >= 0.85); "
          f"64 x r16 all {d['c_throughput_ratio']} x base, floor {d['c_floor_ratio']}")
except Exception as exc:
    print(f"decode benchmark: no result ({exc}) rc {rcs[2]}")
PYEOF
exit $(( tests_rc || kernels_rc || decode_rc ))
