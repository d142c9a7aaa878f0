#!/usr/bin/env bash
# Run claim files on the lent GPU machine, one pytest-benchmark JSON (and log) per report, with provenance.
# On the device, from the repository root (carry .whl when a spec needs the peers or pyzmq):
#   DJINN_GIT_COMMIT=<sha sent> DJINN_GIT_DIRTY=0|1 bash scripts/gpu_suite.sh \
#       memory_layer:tests_exp3/test_swap_bandwidth.py exp3_resume:tests_exp3/test_token_accuracy.py,tests_exp3/test_resume_latency.py
# Each NAME:FILE[,FILE...] writes $OUT/NAME.json and $OUT/NAME.log (the device returns at most 8 files: 4 specs).
# Back here: copy the JSON to reports/h100/NAME.json and run `djinn report reports/h100/NAME.json`.
set -uo pipefail
: "${DJINN_GIT_COMMIT:?set DJINN_GIT_COMMIT to the commit whose tree was sent}"
: "${OUT:?OUT must name the folder whose files come back}"
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -d .whl ]; then
  # shellcheck source=/dev/null
  source scripts/gpu_peers_setup.sh
fi
rc=0
for spec in "$@"; do
  name=${spec%%:*}
  files=${spec#*:}
  echo "== $name: ${files//,/ }"
  python3 -m pytest -m h100 ${files//,/ } --benchmark-json "$OUT/$name.json" -p no:cacheprovider -q -rfE \
    > "$OUT/$name.log" 2>&1 || rc=1
  grep -E "passed|failed|error" "$OUT/$name.log" | tail -3
done
exit $rc
