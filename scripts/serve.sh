#!/usr/bin/env bash
# Set up (virtual environment + install) and run carecoord. With DATABASE_URL unset it
# starts an embedded PostgreSQL in ${CARECOORD_DATA_DIR:-./.carecoord}.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/carecoord ] || [ pyproject.toml -nt .venv/.installed ]; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e .
  touch .venv/.installed
fi
exec .venv/bin/carecoord serve "$@"
