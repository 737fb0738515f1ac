# On the GPU machine (the device tool, with carry [".tvmdev", TARBALL, this script]): tune the tasks exported here
# with --tune-export, for BUDGET seconds per model, one model after the other; the databases come back through $OUT.
#   TARBALL: a tar.xz of tune_<m>/{spec.json, task*.json[, db/ of an earlier chunk, to resume]}
#   MODELS:  the <m> names (default: r50 bert)
# Back here: `tar -xJf <m>_db.tar.xz -C tune_<m>` (its db/: the MetaSchedule database, defaults_gpu.json, and
# tiles_gpu.json of the tile sweep), then `autoglm-compile tune-merge tune_<m> -t nvidia-h100`. One file per model:
# a device call returns at most 8.
set -e
BUDGET=${BUDGET:-240}
TARBALL=${TARBALL:-gpubench/tune.tar.xz}
source .tvmdev/install.sh
export PATH=/usr/local/cuda/bin:$PATH
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/t && tar -xJf "$TARBALL" -C /tmp/t
for m in ${MODELS:-r50 bert}; do
  python3 - "$m" "$BUDGET" <<'PY'
import json, sys
p = f"/tmp/t/tune_{sys.argv[1]}/spec.json"
s = json.load(open(p)); s["time_budget_s"] = float(sys.argv[2]); s["trials_per_task"] = 1000; s["trials"] = 100000; s["cost_model"] = "random"
json.dump(s, open(p, "w"))
PY
  start=$(date +%s)
  timeout $((BUDGET + 50)) python3 -m autoglm_compile.tune_worker /tmp/t/tune_$m/spec.json > /tmp/t/$m.log 2>/tmp/t/$m.err || echo "worker $m rc=$?"
  echo "$m: $(( $(date +%s) - start )) s"; tail -c 1500 /tmp/t/$m.log; tail -3 /tmp/t/$m.err
  tar -cJf "$OUT/${m}_db.tar.xz" -C /tmp/t/tune_$m --exclude db/logs db
done
