#!/usr/bin/env bash
# Run claim files on the lent GPU machine, one pytest-benchmark JSON (and log) per report, with provenance.
# On the device, from the repository root (carry .whl when a spec needs the peers or pyzmq):
#   DJINN_GIT_COMMIT=<sha sent> DJINN_GIT_DIRTY=0|1 bash scripts/gpu_suite.sh \
#       memory_layer:tests_exp3/test_swap_bandwidth.py \
#       exp3_memory_pressure:tests_exp3/test_memory_pressure.py \
#       exp3_memory_pressure_card:tests_exp3/test_memory_pressure.py@card
# `bash scripts/gpu_suite.sh all` runs every report of the h100 profile (djinn_core/bench/profiles.py: H100_REPORTS).
# Each NAME:FILE[,FILE...][@BUDGET][%KEXPR] runs in a pytest process of its own and writes $OUT/NAME.json and
# $OUT/NAME.log. %KEXPR runs a part of a report (pytest -k KEXPR), for a report longer than one device call: name the
# parts NAME.part1, NAME.part2 ... and join them with `djinn merge PARTS -o NAME.json` (djinn_core/bench/merge.py).
# BUDGET is the VRAM budget of that spec (--djinn-vram-budget: 80GB, card, or bytes like 74.5GiB); without one, the
# run's $DJINN_VRAM_BUDGET, else 80GB (the H100 80GB card, enforced on a larger card by capping torch's allocator).
# DJINN_GIT_DIRTY must say 0 or 1: the CI gate refuses a report whose tree state is dirty or unknown.
# --gpu N (first) runs the specs on GPU N alone (CUDA_VISIBLE_DEVICES=N in PCI bus order, which NVML uses too), so a
# machine of several GPUs runs one lane per GPU at once; each JSON's provenance names its GPU (index, UUID, PCI address):
#   bash scripts/gpu_suite.sh --gpu 0 SPECS... & bash scripts/gpu_suite.sh --gpu 1 SPECS... & wait
# Timing claims in one lane share the host (CPUs, memory, root complex) with the other lane's work.
# --run N (after --gpu, if any): the N-th run of the same specs at this commit; from N=2 each spec writes
# $OUT/NAME.runN.json (and .log), which lands as reports/<machine>/runs/NAME.runN.json beside the first run's
# reports/<machine>/NAME.json; `djinn report` then records the spread over the runs.
# Back here: copy each JSON to reports/<machine>/NAME.json (h100, h200, h200x2: the folder names the GPU its
# provenance must show) and run `djinn report reports/<machine>/NAME.json`.
set -uo pipefail
: "${DJINN_GIT_COMMIT:?set DJINN_GIT_COMMIT to the commit whose tree was sent}"
: "${OUT:?OUT must name the folder whose files come back}"
case "${DJINN_GIT_DIRTY:-}" in
  0|1) ;;
  *) echo "DJINN_GIT_DIRTY must be 0 or 1 (was '${DJINN_GIT_DIRTY:-}')" >&2; exit 2 ;;
esac
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ "${1:-}" = --gpu ]; then
  case "${2:-}" in
    ''|*[!0-9]*) echo "--gpu takes a GPU index (was '${2:-}')" >&2; exit 2 ;;
  esac
  export CUDA_DEVICE_ORDER=PCI_BUS_ID CUDA_VISIBLE_DEVICES="$2"
  shift 2
fi
suffix=""
if [ "${1:-}" = --run ]; then
  case "${2:-}" in
    ''|*[!0-9]*|0) echo "--run takes a run number >= 1 (was '${2:-}')" >&2; exit 2 ;;
  esac
  [ "$2" -gt 1 ] && suffix=".run$2"
  shift 2
fi
if [ -d .whl ]; then
  # shellcheck source=/dev/null
  source scripts/gpu_peers_setup.sh  # once per machine: lanes started together wait for the first install
fi
if [ "${1:-}" = all ]; then  # every report of the h100 profile (djinn_core/bench/profiles.py: H100_REPORTS)
  mapfile -t specs < <(python3 -c 'from djinn_core.bench.profiles import report_specs; print(*report_specs(), sep="\n")')
  set -- "${specs[@]}"
fi
rc=0
for spec in "$@"; do
  name=${spec%%:*}
  rest=${spec#*:}
  select=()
  if [ "${rest#*%}" != "$rest" ]; then  # a part of a report: pytest -k KEXPR (join the parts with djinn merge)
    select=(-k "${rest#*%}")
    rest=${rest%%\%*}
  fi
  files=${rest%%@*}
  budget=()
  if [ "$rest" != "$files" ]; then
    budget=("--djinn-vram-budget=${rest#*@}")
  fi
  echo "== $name: ${files//,/ } ${budget[*]:-(budget: ${DJINN_VRAM_BUDGET:-80GB})} ${select[*]:-}"
  python3 -m pytest -m h100 ${files//,/ } "${budget[@]}" "${select[@]}" --benchmark-json "$OUT/$name$suffix.json" \
    -p no:cacheprovider -q -rfE > "$OUT/$name$suffix.log" 2>&1 || rc=1
  grep -E "passed|failed|error" "$OUT/$name$suffix.log" | tail -3
done
exit $rc
