"""mypy over the package as it installs: attrib/, with graphs/ and viz/ as attrib.graphs and attrib.viz.

The repository keeps graphs/ and viz/ at the top level and setuptools maps them into attrib (see
pyproject.toml); mypy cannot follow that mapping, so this copies the three folders into one tree
in a temporary folder, runs mypy there with the project's settings, and reports paths as they are
in the repository. Run from anywhere: ``python tests/typecheck.py``; exit status is mypy's."""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"attrib": "attrib", "graphs": "attrib/graphs", "viz": "attrib/viz"}


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="attrib-typecheck-") as folder:
        tree = Path(folder)
        for source, target in MAPPED.items():
            shutil.copytree(ROOT / source, tree / target, ignore=shutil.ignore_patterns("__pycache__"))
        done = subprocess.run(
            [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tree / ".cache"),
             "attrib"], cwd=tree, capture_output=True, text=True,
        )
        text = done.stdout + done.stderr
        for source, target in sorted(MAPPED.items(), key=lambda item: -len(item[1])):
            text = text.replace(f"{target}/", f"\0{source}/")  # the longest mapped folder first
        print(text.replace("\0", ""), end="")
        return done.returncode


if __name__ == "__main__":
    raise SystemExit(main())
