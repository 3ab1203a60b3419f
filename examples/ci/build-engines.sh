#!/usr/bin/env bash
# Build a list of yitrt recipes, one after another, the way the GitHub Actions example does, for any CI system
# (GitLab, Jenkins, Buildkite) or a shell on a GPU machine inside the Triton TRT-LLM container.
#
#   examples/ci/build-engines.sh [RECIPE ...]        (default: every recipe in recipes/)
#
# Environment:
#   WORK_ROOT      where each recipe's work folder lives (default: yitrt-work); keep it between runs: cached
#                  stages are not redone
#   OUT            where run summaries and deployments are collected (default: ci-out)
#   YITRT_RUN_ARGS extra arguments for every `yitrt run` (e.g. "--until plan" on a CPU machine)
#   YITRT          the yitrt command (default: yitrt)
# Exit status: 0 when every recipe ran, else the exit status of the last recipe that failed.
set -uo pipefail

WORK_ROOT=${WORK_ROOT:-yitrt-work}
OUT=${OUT:-ci-out}
YITRT=${YITRT:-yitrt}
read -r -a EXTRA <<< "${YITRT_RUN_ARGS:-}"
if [ "$#" -eq 0 ]; then set -- recipes/*.yaml; fi
mkdir -p "$OUT"

status=0
for recipe in "$@"; do
  name=$(basename "$recipe" .yaml)
  echo "== $name" >&2
  "$YITRT" run "$recipe" --work-dir "$WORK_ROOT/$name" --json "${EXTRA[@]}" > "$OUT/$name.run.json"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "!! $name failed (exit $rc); summary in $OUT/$name.run.json" >&2
    status=$rc
    continue
  fi
  # the deployment (when the run got that far): the Triton repository, the engine and the resolved recipe
  for part in triton-repo engine recipe.resolved.yaml; do
    if [ -e "$WORK_ROOT/$name/$part" ]; then
      mkdir -p "$OUT/$name"
      cp -a "$WORK_ROOT/$name/$part" "$OUT/$name/"
    fi
  done
done

# one line per recipe: recipe, ok, stages that did work
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.run.json")):
    try:
        d = json.loads(path.read_text())
    except ValueError:
        print(f"{path.name}: no summary (yitrt stopped before running)")
        continue
    work = ", ".join(d.get("did_work") or []) or "nothing (cached)"
    print(f"{d.get('recipe', path.name.removesuffix('.run.json'))}: {'ok' if d['ok'] else 'FAILED: ' + d['error']['message']}; did {work}")
PY
exit "$status"
