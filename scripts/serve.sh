#!/usr/bin/env bash
# Set up (virtual environment + the locked dependencies) and run carecoord. With DATABASE_URL
# unset it starts an embedded PostgreSQL in ${CARECOORD_DATA_DIR:-./.carecoord}.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/carecoord ] || [ pyproject.toml -nt .venv/.installed ] \
   || [ requirements.lock -nt .venv/.installed ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  # Exactly the locked versions (hashes checked), then carecoord itself without resolving again.
  .venv/bin/pip install --quiet --require-hashes -r requirements.lock
  .venv/bin/pip install --quiet --no-deps -e .
  touch .venv/.installed
fi
exec .venv/bin/carecoord serve "$@"
