# Sourced by create.sbatch and worker.sbatch: the same settings as docker-compose.yml.
#
# 1. `.env` in the submit folder (HPO_ENV_FILE to use another), the file compose reads and
#    .env.example documents; a variable already in the environment wins, as with compose.
# 2. The database password from a file, never from a variable or a command line:
#    HPO_DB_PASSWORD_FILE, by default compose's docker/secrets/db_password.
# 3. Slurm-only settings, with their defaults:
#      HPO_ARTIFACTS   checkpoints: a folder every node mounts, or s3://bucket/prefix (with
#                      AWS_ENDPOINT_URL and AWS_SHARED_CREDENTIALS_FILE or the AWS_* keys)
#                      (default: hpo-artifacts in the submit folder)
#      HPO_SIF         an Apptainer image of docker/Dockerfile (apptainer build hpo.sif
#                      docker://registry.example/resnet-hpo:1); empty: use HPO_VENV
#      HPO_VENV        a virtualenv with this project installed (default: .venv in the repository)
# HPO_DB_HOST and HPO_DB_PORT must name the database as the compute nodes reach it (in .env
# they name compose's `postgres` service).

# Jobs run in the folder they were submitted from (the repository root, as a rule): .env, the
# password file, logs and default artifacts are found there; this repository's scripts and .venv
# in HPO_REPO, which submit.sh sets.
HPO_REPO="${HPO_REPO:-$PWD}"
hpo_env_file="${HPO_ENV_FILE:-.env}"
if [ -f "$hpo_env_file" ]; then
  while IFS= read -r line || [ -n "$line" ]; do
    case "$line" in ''|'#'*) continue ;; esac
    key="${line%%=*}" value="${line#*=}"
    value="${value%\"}" value="${value#\"}" value="${value%\'}" value="${value#\'}"
    # An exported variable wins over the file, as in docker compose.
    [ -n "${!key+set}" ] || export "$key=$value"
  done < "$hpo_env_file"
fi

: "${HPO_STUDY:?set HPO_STUDY in .env (see .env.example)}"
: "${HPO_SPACE:?set HPO_SPACE in .env (see .env.example)}"
export HPO_DB_HOST="${HPO_DB_HOST:-postgres}" HPO_DB_PORT="${HPO_DB_PORT:-5432}"
export HPO_DB_NAME="${HPO_DB_NAME:-hpo}" HPO_DB_USER="${HPO_DB_USER:-hpo}"
export HPO_DB_PASSWORD_FILE="${HPO_DB_PASSWORD_FILE:-$PWD/docker/secrets/db_password}"
export HPO_SPACES_DIR="${HPO_SPACES_DIR:-./spaces}" HPO_DATA_DIR="${HPO_DATA_DIR:-./data}"
export HPO_ARTIFACTS="${HPO_ARTIFACTS:-$PWD/hpo-artifacts}"
export HPO_DEVICE="${HPO_DEVICE:-cuda:free}" HPO_THREADS="${HPO_THREADS:-4}"
# cuda:free (.env's value) claims the lowest GPU index that no other worker sharing this lock
# folder holds. Slurm shows each task only its own GPUs (CUDA_VISIBLE_DEVICES), all starting at
# index 0, so each job (an array task is one) gets a lock folder of its own.
export HPO_GPU_LOCK_DIR="${HPO_GPU_LOCK_DIR:-${TMPDIR:-/tmp}/hpo-gpu-locks-${SLURM_JOB_ID:-$$}}"
HPO_VENV="${HPO_VENV:-$HPO_REPO/.venv}"
# Output reaches the job's log file as it happens, not when a buffer fills.
export PYTHONUNBUFFERED=1

if [ ! -r "$HPO_DB_PASSWORD_FILE" ]; then
  echo "hpo-slurm: the password file HPO_DB_PASSWORD_FILE=$HPO_DB_PASSWORD_FILE is not readable" >&2
  exit 2
fi

# Run `hpo ARGS` in place of this shell (exec), so that Slurm's signals reach hpo itself.
hpo_exec() {
  if [ -n "${HPO_PRINT_ONLY:-}" ]; then  # what would run: for checks, no database needed
    printf 'argv'; printf ' %q' "$@"; printf '\n'; env | grep '^HPO_' | sort; exit 0
  fi
  if [ -n "${HPO_SIF:-}" ]; then
    # The image's layout (docker/Dockerfile): data under /data, run from /workspace.
    mkdir -p "$HPO_DATA_DIR"
    exec apptainer exec --nv --cleanenv --env PYTHONUNBUFFERED=1 \
      --bind "$HPO_DATA_DIR:/data" --pwd /workspace "$HPO_SIF" hpo "$@"
  fi
  if [ ! -x "$HPO_VENV/bin/hpo" ]; then
    echo "hpo-slurm: no hpo in HPO_VENV=$HPO_VENV (make .venv, or set HPO_SIF)" >&2
    exit 2
  fi
  exec "$HPO_VENV/bin/hpo" "$@"
}
