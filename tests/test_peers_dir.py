"""bench/peers_dir.py: a copied peer imports from the folder and keeps its version metadata (the
bench JSON's `versions` reads it with importlib.metadata)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata

import pytest

from bench import peers_dir


def test_copied_distribution_imports_with_its_version(tmp_path):
    tops = peers_dir.copy_distribution("iniconfig", tmp_path)   # pytest's own small dependency
    assert "iniconfig" in tops and any(t.endswith(".dist-info") for t in tops)
    found = [d.version for d in metadata.distributions(path=[str(tmp_path)])]
    assert found == [metadata.version("iniconfig")]
    assert not list(tmp_path.rglob("__pycache__"))   # bytecode of this Python is not carried
    code = "import iniconfig, sys; print(iniconfig.__file__)"
    run = subprocess.run([sys.executable, "-I", "-c",
                          f"import sys; sys.path.insert(0, {str(tmp_path)!r}); {code}"],
                         capture_output=True, text=True, check=True)
    assert run.stdout.strip().startswith(str(tmp_path))


def test_unknown_distribution_is_named(tmp_path):
    with pytest.raises(metadata.PackageNotFoundError, match="no-such-peer-dist"):
        peers_dir.main([str(tmp_path), "no-such-peer-dist"])
