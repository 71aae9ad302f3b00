#!/usr/bin/env bash
# Makes sure a PostgreSQL server answers for the tests: finds one, starts an installed cluster, or
# (as root, e.g. in CI) installs Debian's package and starts it. The tests connect to
# HPO_TEST_PG (default postgresql://postgres@127.0.0.1:5432/postgres) and make their own databases.
set -euo pipefail
url=${HPO_TEST_PG:-postgresql://postgres@127.0.0.1:5432/postgres}
host=127.0.0.1 port=5432

ready() { pg_isready -q -h "$host" -p "$port" 2>/dev/null; }

if command -v pg_isready >/dev/null && ready; then
  echo "postgres: answering on $host:$port"
  exit 0
fi
if ! command -v pg_ctlcluster >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "postgres: not installed; installing Debian's postgresql"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
  else
    echo "postgres: not found. Install PostgreSQL (e.g. apt-get install postgresql), or point" \
         "HPO_TEST_PG at a server where the user may create databases: $url" >&2
    exit 1
  fi
fi
version=$(ls /etc/postgresql | sort -V | tail -n 1)
echo "postgres: starting cluster $version/main"
if [ "$(id -u)" = 0 ]; then
  pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
else
  pg_ctlcluster "$version" main start || true
fi
for _ in $(seq 1 30); do ready && { echo "postgres: up"; exit 0; }; sleep 1; done
echo "postgres: did not come up on $host:$port" >&2
exit 1
