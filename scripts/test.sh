#!/usr/bin/env bash
# Run the whole test suite against a local PostgreSQL 17 + Apache AGE.
#
#   scripts/test.sh [pytest arguments...]
#
# Works from a clean clone on a fresh Debian machine (as root it installs
# what is missing); a second run reuses .venv and the cached PostgreSQL root.
# Tests that need PostgreSQL fail rather than skip. Environment:
#   GOVDB_PG_DATA_DIR  the server's data directory (default .govdb/pg)
#   GOVDB_PG_PORT      its port (default: 55432, or the next free one)
#   PYTHON             the Python (>= 3.11) to build .venv with
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=.venv
DATA_DIR=${GOVDB_PG_DATA_DIR:-.govdb/pg}

now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
START_MS=$(now_ms)
STAGE_MS=$START_MS
stage() {  # stage NAME: print how long the stage that just ended took
    local t
    t=$(now_ms)
    printf '[test.sh] %-40s %5d.%01ds\n' "$1" $(((t - STAGE_MS) / 1000)) $(((t - STAGE_MS) % 1000 / 100))
    STAGE_MS=$t
}
as_root() { [ "$(id -u)" -eq 0 ]; }
apt_install() {
    as_root && command -v apt-get >/dev/null || return 1
    echo "[test.sh] apt-get install $*"
    DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >/dev/null
}
python_ok() { "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' >/dev/null 2>&1; }

find_python() {
    local py
    for py in ${PYTHON:-} python3 python3.13 python3.12 python3.11; do
        if command -v "$py" >/dev/null && python_ok "$py"; then echo "$py"; return 0; fi
    done
    return 1
}

if ! python_ok "$VENV/bin/python" || [ ! -x "$VENV/bin/pip" ]; then
    PY=$(find_python) || { apt_install python3 python3-venv && PY=$(find_python); } || {
        echo "error: no Python >= 3.11 found; install python3 (>= 3.11) and python3-venv" >&2; exit 1; }
    rm -rf "$VENV"
    if ! "$PY" -m venv "$VENV" >/dev/null 2>&1; then
        rm -rf "$VENV"
        # Debian's python3 lacks ensurepip until python3-venv is installed.
        apt_install python3-venv || { echo "error: $PY -m venv failed; install python3-venv" >&2; exit 1; }
        "$PY" -m venv "$VENV"
    fi
fi
stage "python venv ($("$VENV/bin/python" -c 'import platform; print(platform.python_version())'))"

# Reinstall only when the project's metadata changed: the install is editable.
STAMP="$VENV/.govdb-installed"
WANT=$({ cat pyproject.toml; "$VENV/bin/python" --version; } | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ] || [ ! -x "$VENV/bin/govdb" ]; then
    "$VENV/bin/pip" install -q --disable-pip-version-check -e '.[test]'
    echo "$WANT" >"$STAMP"
fi
stage "pip install -e .[test]"

GOVDB="$VENV/bin/govdb"
pick_port() {
    "$VENV/bin/python" - <<'EOF'
import socket
for port in range(55432, 55532):
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        print(port)
        break
EOF
}

# Leave running a server that was running before; stop the one started here.
STARTED_HERE=0
if ! "$GOVDB" pg url --data-dir "$DATA_DIR" >/dev/null 2>&1; then
    STARTED_HERE=1
fi
on_exit() {
    local rc=$?
    if [ "$STARTED_HERE" -eq 1 ]; then
        STAGE_MS=$(now_ms)
        if ! "$GOVDB" pg stop --data-dir "$DATA_DIR" && [ "$rc" -eq 0 ]; then rc=1; fi
        stage "govdb pg stop"
    fi
    local t
    t=$(now_ms)
    printf '[test.sh] %-40s %5d.%01ds (exit %d)\n' "total" $(((t - START_MS) / 1000)) $(((t - START_MS) % 1000 / 100)) "$rc"
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PORT=${GOVDB_PG_PORT:-$(pick_port)}
"$GOVDB" pg start --data-dir "$DATA_DIR" --port "$PORT"
GOVDB_TEST_POSTGRES_URL=$("$GOVDB" pg url --data-dir "$DATA_DIR")
export GOVDB_TEST_POSTGRES_URL
export GOVDB_REQUIRE_POSTGRES=1
stage "govdb pg start"

set +e
"$VENV/bin/pytest" -q "$@"
rc=$?
stage "pytest"
TZ=America/Los_Angeles "$VENV/bin/pytest" -q tests/test_db_backends.py
rc_tz=$?
stage "pytest backends, TZ=America/Los_Angeles"
set -e

for code in "$rc" "$rc_tz"; do
    if [ "$code" -eq 5 ]; then echo "[test.sh] error: pytest collected no tests" >&2; fi
done
if [ "$rc" -ne 0 ]; then exit "$rc"; fi
exit "$rc_tz"
