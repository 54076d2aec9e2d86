"""What a wheel ships: an installed package (no checkout around it) can migrate its database."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_scan_db_upgrade_works_from_an_installed_wheel(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("app", "ml", "workers", "cli", "migrations"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(src)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("scan_service-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "migrations/env.py" in names and "migrations/script.py.mako" in names
    assert any(n.startswith("migrations/versions/0001_") for n in names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "elsewhere"  # no alembic.ini, no migrations/ folder in sight
    work.mkdir()
    db = work / "scan.db"
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "SCAN_VAR_DIR": str(work / "var"),
        "SCAN_DATABASE_URL": f"sqlite:///{db}",
    }
    code = (
        "import app, migrations, sys; assert app.__file__.startswith(sys.argv[1]), app.__file__; "
        "assert migrations.__file__.startswith(sys.argv[1]), migrations.__file__; "
        "from cli.main import main; sys.argv = ['scan', 'db', 'upgrade']; main()"
    )
    done = subprocess.run([sys.executable, "-c", code, str(site)], cwd=work, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "latest schema" in done.stdout
    tables = {r[0] for r in sqlite3.connect(db).execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"runs", "datasets", "alembic_version"} <= tables
