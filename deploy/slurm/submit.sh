#!/bin/bash
# Submit a search to Slurm: `hpo create` once, then N workers (one per GPU) as a job array that
# starts when create succeeded. Run from the repository root:
#
#   deploy/slurm/submit.sh 8                 # 8 workers; extra sbatch options may follow
#   squeue --me                              # watch; logs in hpo-worker-<job>_<task>.log
#   scancel <job>                            # stop: every worker hands its trial back
#
# Settings: .env and the password file, as for docker compose (deploy/slurm/settings.sh).
set -euo pipefail
workers="${1:?usage: deploy/slurm/submit.sh WORKERS [sbatch options...]}"
shift
case "$workers" in ''|*[!0-9]*|0) echo "submit.sh: WORKERS must be a whole number > 0, not $workers" >&2; exit 2 ;; esac
here="$(cd "$(dirname "$0")" && pwd)"
# Slurm copies a batch script away before it runs: tell it where the rest of the repository is.
export HPO_REPO="${HPO_REPO:-$(cd "$here/../.." && pwd)}"
create="$(sbatch --parsable "$@" "$here/create.sbatch")"
array="$(sbatch --parsable --array="0-$((workers - 1))" --dependency="afterok:${create%%;*}" \
  --kill-on-invalid-dep=yes "$@" "$here/worker.sbatch")"
echo "create: job ${create%%;*}; workers: job array ${array%%;*} (${workers} tasks)"
