#!/usr/bin/env bash
# Set up (virtual environment + the locked dependencies with test tools), lint, type-check and
# run the tests. Tests use DATABASE_URL (a PostgreSQL server; a fresh database is created on it)
# when set, and the embedded PostgreSQL otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/pytest ] || [ pyproject.toml -nt .venv/.installed-test ] \
   || [ requirements-dev.lock -nt .venv/.installed-test ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  # Exactly the locked versions (hashes checked), then carecoord itself without resolving again.
  .venv/bin/pip install --quiet --require-hashes -r requirements-dev.lock
  .venv/bin/pip install --quiet --no-deps -e .
  touch .venv/.installed-test
fi
# The SMART bulk-data-client that tests/test_bulk_export_processes.py runs (vendored source; its
# dependencies from the npm registry). Without npm the test says why it skips.
if command -v npm >/dev/null && [ ! -d tests/bulk_data_client/node_modules ]; then
  (cd tests/bulk_data_client && npm ci --omit=dev --no-audit --no-fund --engine-strict=false \
     --loglevel=error >/dev/null) || echo "bulk-data-client: npm ci failed; its test will be skipped"
fi
.venv/bin/ruff check .
.venv/bin/mypy --strict app
exec .venv/bin/pytest "$@"
