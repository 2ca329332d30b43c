#!/usr/bin/env bash
# Regenerate the lock files from pyproject.toml (run it after changing a dependency there; pass
# --upgrade, or --upgrade-package NAME, to move pins forward):
#   requirements-dev.lock  runtime + test dependencies: scripts/test.sh and CI install it
#   requirements.lock      runtime dependencies at the same versions: scripts/serve.sh, Dockerfile
# Every pin carries its hashes, so pip installs exactly these files. Resolved on Linux with
# CPython 3.11 (the CI machine and the Docker image). pip-tools runs in a throwaway environment.
set -euo pipefail
cd "$(dirname "$0")/.."
tools="$(mktemp -d)"
trap 'rm -rf "$tools"' EXIT
python3 -m venv "$tools"
"$tools/bin/pip" install --quiet "pip-tools>=7.4"
export CUSTOM_COMPILE_COMMAND="bash scripts/lock.sh"
options=(--quiet --generate-hashes --allow-unsafe --strip-extras
         --no-emit-find-links --no-emit-index-url --no-emit-trusted-host "$@")
"$tools/bin/pip-compile" "${options[@]}" --extra test --output-file requirements-dev.lock pyproject.toml
"$tools/bin/pip-compile" "${options[@]}" --constraint requirements-dev.lock --output-file requirements.lock \
  pyproject.toml
