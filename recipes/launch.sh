#!/usr/bin/env bash
# Launch `mindyouzhi train` under msrun (MindSpore's launcher) for data-parallel training on one or
# many nodes.  Every worker runs the same recipe; the backend comes from the device (HCCL on Ascend,
# mccl on CPU).  Run it from an activated environment: msrun spawns `python` from PATH.
#
#   recipes/launch.sh --config recipes/gkd_smollm2_cpu.yaml --workers 2            # one node, 2 workers
#   # two nodes × 16 workers (run on each node, node 0's address as master):
#   recipes/launch.sh --config recipes/sft_youzhi7b_a3.yaml --workers 32 --local-workers 16 \
#       --master-addr 10.0.0.1 --master-port 8118 --node-rank 0 --log-dir logs/sft7b
#
# Options (defaults in brackets):
#   --config FILE         recipe (required)
#   --workers N           total workers over all nodes [data_parallel × model_parallel × pipeline_stage]
#   --local-workers N     workers on this node [--workers]
#   --master-addr ADDR    scheduler address, node 0 [127.0.0.1]
#   --master-port PORT    scheduler port [8118]
#   --node-rank R         this node's rank (multi-node) [assigned by msrun]
#   --log-dir DIR         msrun's scheduler.log / worker_N.log [<output_dir>/msrun_log]
#   --join true|false     wait for the workers and report their result [true]
#   --cluster-timeout S   seconds to wait for every worker to join [600]
#   --                    anything after this goes to `mindyouzhi train` (e.g. --no-resume)
set -euo pipefail

usage() { sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
die() { echo "error: $*" >&2; exit 2; }

CONFIG="" WORKERS="" LOCAL="" ADDR="127.0.0.1" PORT="8118" NODE_RANK="" LOG_DIR="" JOIN="True" TIMEOUT="600"
EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
    --workers) WORKERS="${2:?}"; shift 2 ;;
    --local-workers) LOCAL="${2:?}"; shift 2 ;;
    --master-addr) ADDR="${2:?}"; shift 2 ;;
    --master-port) PORT="${2:?}"; shift 2 ;;
    --node-rank) NODE_RANK="${2:?}"; shift 2 ;;
    --log-dir) LOG_DIR="${2:?}"; shift 2 ;;
    --join) case "${2:?}" in true|True) JOIN="True" ;; false|False) JOIN="False" ;; *) die "--join true|false" ;; esac; shift 2 ;;
    --cluster-timeout) TIMEOUT="${2:?}"; shift 2 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ -n "$CONFIG" ]] || die "--config FILE is required"
[[ -f "$CONFIG" ]] || die "--config $CONFIG: recipe file not found"
command -v msrun >/dev/null || die "msrun not found on PATH: activate the environment that has MindSpore"
command -v python >/dev/null || die "python not found on PATH (msrun spawns python from PATH)"

# Validate the recipe before starting any worker, and read its defaults.
read -r DP OUT < <(python - "$CONFIG" <<'PY'
import sys
from mindyouzhi.errors import UserError
from mindyouzhi.train.config import load_recipe
try:
    recipe = load_recipe(sys.argv[1])
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
print(recipe.workers, recipe.output_dir)
PY
) || exit 2
WORKERS="${WORKERS:-$DP}"
LOCAL="${LOCAL:-$WORKERS}"
LOG_DIR="${LOG_DIR:-$OUT/msrun_log}"
[[ "$WORKERS" == "$DP" ]] || die "--workers $WORKERS but the recipe's parallel_config needs $DP (data × model × pipeline parallel)"
TASK="$(python -c 'import mindyouzhi.train.__main__ as m; print(m.__file__)')"

ARGS=(--worker_num="$WORKERS" --local_worker_num="$LOCAL" --master_addr="$ADDR" --master_port="$PORT"
      --log_dir="$LOG_DIR" --join="$JOIN" --cluster_time_out="$TIMEOUT")
[[ -n "$NODE_RANK" ]] && ARGS+=(--node_rank="$NODE_RANK")
mkdir -p "$LOG_DIR"
echo "msrun ${ARGS[*]} $TASK --config $CONFIG ${EXTRA[*]:-}" >&2
exec msrun "${ARGS[@]}" "$TASK" --config "$CONFIG" "${EXTRA[@]}"
