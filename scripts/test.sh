#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. CI runs exactly this (.ci/run).
#   ./scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# shellcheck disable=SC1091
source "${RAGTUNE_VENV:-.venv}/bin/activate"
# Two pytest workers (pytest-xdist), one thread each: many tests wait on a subprocess or a server, so a
# single worker left a 2-core machine half idle (11:10 -> 7:50 for the suite). RAGTUNE_TEST_WORKERS=1: one.
# The chat page's tests drive a real headless Chromium (Debian's, through Playwright from the test extra).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: installing chromium (Debian) for the chat page tests" >&2
        apt-get install -y -q chromium >/dev/null 2>&1 \
            || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1; } \
            || echo "test.sh: could not install chromium; the chat page tests will fail" >&2
    else
        echo "test.sh: no chromium; the chat page tests will fail: sudo apt-get install chromium" >&2
    fi
fi
workers="${RAGTUNE_TEST_WORKERS:-2}"
if [ "$workers" -gt 1 ]; then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    set -- -n "$workers" "$@"
else
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
fi
set +e
python -m pytest -q "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "test.sh: pytest collected no tests; that is a failure" >&2
    exit 1
fi
exit "$rc"
