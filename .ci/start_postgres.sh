#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on 127.0.0.1 for the store tests (idempotent).
#
#   eval "$(bash .ci/start_postgres.sh)"      # sets PPO_FEEDBACK_TEST_PG_URL
#   bash .ci/start_postgres.sh stop           # stops the server again
#
# Installs Debian's postgresql if it is missing, creates a cluster in $PPO_FEEDBACK_PG_DIR
# (default /tmp/ppo-feedback-pg) owned by the postgres user when run as root, starts it on
# 127.0.0.1:$PPO_FEEDBACK_PG_PORT (default 54329), creates a user and database, and prints
# one `export PPO_FEEDBACK_TEST_PG_URL=...` line on stdout (also written to $DIR/env).
# Everything else goes to stderr. The server runs with fsync off: test data only.
set -euo pipefail

PG_DIR="${PPO_FEEDBACK_PG_DIR:-/tmp/ppo-feedback-pg}"
PG_PORT="${PPO_FEEDBACK_PG_PORT:-54329}"
PG_USER=ppo_feedback
PG_PASSWORD=ppo_feedback
PG_DB=ppo_feedback_test
DATA="$PG_DIR/data"

log() { echo "start_postgres: $*" >&2; }

find_bin() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    [[ -n "$dir" && -x "$dir/pg_ctl" ]] && echo "$dir"
}

BIN=$(find_bin || true)
if [[ -z "$BIN" ]]; then
    log "installing Debian's postgresql"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update && apt-get install -y --no-install-recommends postgresql; } >&2
    BIN=$(find_bin)
fi

# initdb and the server refuse to run as root: use the postgres account the package creates.
if [[ $(id -u) -eq 0 ]]; then
    as_pg() { runuser -u postgres -- "$@"; }
    mkdir -p "$PG_DIR"
    chown postgres: "$PG_DIR"
else
    as_pg() { "$@"; }
    mkdir -p "$PG_DIR"
fi
chmod 700 "$PG_DIR"

if [[ "${1:-start}" == stop ]]; then
    if [[ -f "$DATA/PG_VERSION" ]] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
        as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w stop >&2
    fi
    exit 0
fi

if [[ ! -f "$DATA/PG_VERSION" ]]; then
    log "creating a cluster in $DATA"
    as_pg "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --no-locale \
        --auth-local=trust --auth-host=scram-sha-256 >&2
fi

if ! as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; then
    log "starting the server on 127.0.0.1:$PG_PORT"
    as_pg "$BIN/pg_ctl" -D "$DATA" -l "$PG_DIR/server.log" -w -t 60 start \
        -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" >&2
fi

psql_admin() { as_pg "$BIN/psql" -h "$PG_DIR" -p "$PG_PORT" -U postgres -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }

if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" ]]; then
    psql_admin -c "CREATE ROLE $PG_USER LOGIN PASSWORD '$PG_PASSWORD'" >&2
fi
if [[ -z "$(psql_admin -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DB'")" ]]; then
    psql_admin -c "CREATE DATABASE $PG_DB OWNER $PG_USER" >&2
fi

line="export PPO_FEEDBACK_TEST_PG_URL=postgresql+psycopg://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
echo "$line" > "$PG_DIR/env"
chmod 644 "$PG_DIR/env"
echo "$line"
