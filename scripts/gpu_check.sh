#!/usr/bin/env bash
# Every GPU check in one call, under 8 minutes on one H100/H200, no network, nothing installed: it uses the
# python3, torch, CuPy, transformers and peft it finds (their versions may differ from the project's pins) and
# says first what it found and what is missing. Then the `gpu` tests, the kernel benchmark and the 8B-shape
# decode benchmark; JSON and logs under $OUT, the table last. Exit status: 0 only if every GPU test ran and
# passed (a skip counts as a failure) and both benchmarks gave figures.
#   scripts/gpu_check.sh            on a GPU machine
#   scripts/gpu_check.sh --dry-run  anywhere: checks its own prerequisites report, its parsing of recorded
#                                   sample output (tests/scripts/samples) and its exit codes; no GPU work
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/loraplex-gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 CUPY_CACHE_DIR="${CUPY_CACHE_DIR:-$OUT/cupy-cache}"
PY="${PYTHON:-python3}"

read -r -d '' HELPER <<'PYEOF'
import importlib, json, platform, shutil, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path


def version(name):
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # ImportError, or a broken install
        return None, f"{type(exc).__name__}: {exc}"
    return getattr(module, "__version__", "?"), None


def prereq():
    """What this machine has; the last line says what is missing. Exit 0: the GPU checks can run."""
    print(f"python {platform.python_version()} at {sys.executable}")
    missing = []
    torch_v, err = version("torch")
    if torch_v is None:
        missing.append(f"torch ({err})")
        gpus = 0
    else:
        import torch
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"torch {torch_v} (CUDA {torch.version.cuda}), {gpus} GPU(s) visible"
              + "".join(f"; {i}: {torch.cuda.get_device_name(i)}" for i in range(gpus)))
        if not gpus:
            missing.append("a CUDA GPU visible to torch")
    for name, why in (("cupy", "the LoRA kernels"), ("transformers", "the model oracle"), ("peft", "adapters")):
        v, err = version(name)
        print(f"{name} {v}" if v else f"{name}: not importable ({err})")
        if v is None:
            missing.append(f"{name} ({why})")
    smi = shutil.which("nvidia-smi")
    if smi:
        q = subprocess.run([smi, "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True)
        print("nvidia-smi:", q.stdout.strip() or q.stderr.strip())
    else:
        print("nvidia-smi: not found")
    print(f"gpus={gpus}")
    print("missing: " + ("; ".join(missing) if missing else "nothing"))
    return 3 if missing else 0


def tests_line(xml_path, rc):
    """(line, ok): the GPU tests' counts; ok only if some ran, none failed or errored, none was skipped."""
    try:
        root = ET.parse(xml_path).getroot()
    except Exception as exc:
        return f"gpu tests: no report ({type(exc).__name__}), pytest rc {rc}", False
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = {k: int(suite.attrib.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    ok = rc == 0 and a["tests"] > 0 and a["failures"] == a["errors"] == a["skipped"] == 0
    skipped = [c.attrib.get("name", "?") for c in suite.iter("testcase") if c.find("skipped") is not None]
    line = (f"gpu tests: {a['tests']} run, {a['failures']} failed, {a['errors']} errors, {a['skipped']} skipped"
            f" (pytest rc {rc})")
    if skipped:
        line += "; skipped: " + ", ".join(skipped[:5])
    return line, ok


def summary(out, tests_rc, kernels_rc, decode_rc, note=""):
    """The closing table; exit status 0 only if everything ran and passed."""
    out = Path(out)
    print("\n==== loraplex GPU check ====")
    if note:
        print(note)
    line, ok = tests_line(out / "gpu-tests.xml", int(tests_rc))
    print(line)
    try:
        k = json.loads((out / "kernels.json").read_text())
        print(f"kernels on {k.get('device', '?')}: device-to-device copy {k['copy_gbs']} GB/s (read + write)")
        print(f"{'case':36} {'us':>9} {'GB/s':>8} {'%copy':>6} {'x gather+bmm':>13} {'x loop':>7}")
        for c in k["cases"]:
            print(f"{c['case']:36} {c['kernel_us']:>9} {c['kernel_gbs']:>8} {c['pct_of_copy']:>6}"
                  f" {c['x_gather_bmm']:>13} {c['x_loop']:>7}")
        ok = ok and int(kernels_rc) == 0
    except Exception as exc:
        print(f"kernel benchmark: no result ({type(exc).__name__}: {exc}), rc {kernels_rc}")
        ok = False
    try:
        d = json.loads((out / "decode.json").read_text())
        print(f"decode, Llama-8B shapes, random bf16, batch {d['batch']} on {d.get('device', '?')}:")
        print(f"  base step: eager {d['eager_base_ms']} ms, graphed {d['graph_base_ms']} ms")
        print(f"  64 distinct r8 q/k/v/o / base (throughput): eager {d['eager_ratio']}, graphed {d['graph_ratio']}"
              " (goal >= 0.9 graphed)")
        if "served_ratio" in d:
            print(f"  served through the shard engine, eager decode: mixed / base {d['served_ratio']}"
                  f" ({d['served_mixed_tps']} vs {d['served_base_tps']} tokens/s)")
        if "served_graph_ratio" in d:
            print(f"  served through the shard engine, graphed decode: mixed / base {d['served_graph_ratio']}"
                  f" ({d['served_graph_mixed_tps']} vs {d['served_graph_base_tps']} tokens/s)")
        elif "served_graph_error" in d:
            print(f"  served, graphed decode: no figure ({d['served_graph_error']})")
        ok = ok and int(decode_rc) == 0
    except Exception as exc:
        print(f"decode benchmark: no result ({type(exc).__name__}: {exc}), rc {decode_rc}")
        ok = False
    print("result: " + ("PASS" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    sys.exit({"prereq": prereq, "summary": summary}[command](*args))
PYEOF

helper() { "$PY" -c "$HELPER" "$@"; }

if [[ "${1:-}" == "--dry-run" ]]; then
  SAMPLES=tests/scripts/samples
  failures=0
  expect() {  # expect <wanted rc: 0 or nonzero> <what> <command...>
    local want=$1 what=$2; shift 2
    local log rc
    log=$("$@" 2>&1); rc=$?
    if [[ $want == any ]] || { [[ $want == 0 ]] && [[ $rc == 0 ]]; } || { [[ $want != 0 ]] && [[ $rc != 0 ]]; }; then
      echo "dry run: ok   - $what (rc $rc)"
    else
      echo "dry run: FAIL - $what (rc $rc, wanted $want)"; echo "$log"; failures=$((failures + 1))
    fi
    LAST_LOG=$log
  }
  expect any "prerequisites report runs and names what is missing" helper prereq
  if ! grep -q '^missing: ' <<<"$LAST_LOG" || ! grep -q '^python ' <<<"$LAST_LOG"; then
    echo "dry run: FAIL - the prerequisites report lacks its python/missing lines"; failures=$((failures + 1))
  fi
  echo "$LAST_LOG" | sed 's/^/    /'
  expect 0 "recorded good run parses and passes" helper summary "$SAMPLES/good" 0 0 0
  for want in "copy 4310.2 GB/s" "decode: 64 distinct, r16" "graphed 0.93" "mixed / base 0.88" "result: PASS"; do
    grep -qF "$want" <<<"$LAST_LOG" || { echo "dry run: FAIL - table lacks '$want'"; failures=$((failures + 1)); }
  done
  expect 1 "a skipped GPU test fails the check" helper summary "$SAMPLES/skipped" 0 0 0
  grep -qF "skipped: test_two_gpus" <<<"$LAST_LOG" || { echo "dry run: FAIL - skip not named"; failures=$((failures + 1)); }
  expect 1 "a failed benchmark fails the check" helper summary "$SAMPLES/good" 0 0 1
  expect 1 "a failing pytest run fails the check" helper summary "$SAMPLES/good" 1 0 0
  expect 1 "missing results fail the check" helper summary "$OUT/nothing-here" 0 0 0
  [[ $failures == 0 ]] && echo "dry run: all checks behave" || echo "dry run: $failures problem(s)"
  exit $(( failures > 0 ))
fi

helper prereq | tee "$OUT/prereq.txt"
prereq_rc=${PIPESTATUS[0]}
if [[ $prereq_rc != 0 ]]; then
  echo "gpu_check: cannot run the GPU checks here (see 'missing' above)" >&2
  exit 2
fi
gpus=$(sed -n 's/^gpus=//p' "$OUT/prereq.txt")
select=(-m gpu)
note=""
if [[ ${gpus:-0} -lt 2 ]]; then
  select+=(-k "not two_gpus")  # deselected, not skipped: this machine cannot run it
  note="tensor parallelism on 2 GPUs: not run ($gpus GPU here)"
fi
start=$SECONDS
timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs "${select[@]}" tests/kernels tests/shard \
  --junitxml "$OUT/gpu-tests.xml" 2>&1 | tee "$OUT/gpu-tests.log" | tail -25
tests_rc=${PIPESTATUS[0]}
echo "tests took $((SECONDS - start)) s"
timeout 75 "$PY" benchmarks/kernels_gpu.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.log"
kernels_rc=${PIPESTATUS[0]}
timeout 135 "$PY" benchmarks/gpu_decode.py --json "$OUT/decode.json" 2>&1 | tee "$OUT/decode.log" | tail -5
decode_rc=${PIPESTATUS[0]}
echo "all took $((SECONDS - start)) s"
helper summary "$OUT" "$tests_rc" "$kernels_rc" "$decode_rc" "$note"
