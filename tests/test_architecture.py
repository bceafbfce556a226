"""The import contracts (setup.cfg ``[importlinter]``) hold, and they do catch a wrong-way import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT_IMPORTS.exists(), reason="import-linter is not installed")


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # The copy under test comes before the installed tree; wide lines so a contract name stays on one.
    env = {**os.environ, "PYTHONPATH": str(tree), "COLUMNS": "400"}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(tree / "setup.cfg"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=120)


def copy_tree(dest: Path) -> Path:
    for name in ("cli", "server", "pipelines", "tasks", "app"):
        shutil.copytree(ROOT / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "examples"))
    shutil.copy(ROOT / "setup.cfg", dest / "setup.cfg")
    return dest


def test_the_tree_keeps_every_contract(tmp_path: Path) -> None:
    result = lint_imports(copy_tree(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


@pytest.mark.parametrize(("module", "bad_import", "contract"), [
    ("app/worker/lease.py", "import pipelines.run", "Layers"),           # worker runtime → pipelines
    ("app/core/settings.py", "import app.worker.registry", "The core"),  # core → worker runtime
    ("app/core/keys.py", "import celery", "The core"),                   # core → Celery
    ("app/celery.py", "import tasks.definitions", "Layers"),             # Celery app → its tasks
    ("app/celeryconfig.py", "import app.celery", "Layers"),              # settings → the app above them
    ("tasks/executors/echo.py", "import celery", "Executors"),           # executor → Celery
    ("tasks/base.py", "import server.app", "Layers"),                    # tasks → entry point
    ("server/app.py", "import cli.main", "Layers"),                      # server → CLI
])
def test_a_wrong_way_import_breaks_a_contract(tmp_path: Path, module: str, bad_import: str, contract: str) -> None:
    tree = copy_tree(tmp_path)
    path = tree / module
    # Inside a function, as a lazy import would be: it still counts.
    path.write_text(path.read_text() + f"\n\ndef _wrong_way() -> None:\n    {bad_import}  # noqa\n")
    result = lint_imports(tree)
    assert result.returncode != 0, result.stdout
    broken = [line for line in result.stdout.splitlines() if line.endswith("BROKEN")]
    assert any(line.startswith(contract) for line in broken), result.stdout
