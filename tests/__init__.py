"""carecoord's test suite."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The source tree (the working directory of the tests' subprocesses). The application itself
never looks for it: an installed carecoord has none (tests/test_packaging.py)."""
