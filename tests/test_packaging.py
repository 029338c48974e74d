"""The source distribution builds on its own: every file the C++/CUDA sources include is in it.

setuptools packs the sources setup.py names, not the headers they include; without MANIFEST.in the
sdist (and every wheel built from it, as `python -m build` does) would not compile.
"""

import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_LOCAL_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.M)


def _included(path: str) -> set[str]:
    """Repository paths of the quoted includes of one csrc file (resolved as setup.py's -I do)."""
    text = open(path, encoding="utf-8").read()
    found = set()
    for name in _LOCAL_INCLUDE.findall(text):
        for base in (os.path.dirname(path), os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")):
            cand = os.path.normpath(os.path.join(base, name))
            if os.path.exists(cand):
                found.add(os.path.relpath(cand, ROOT))
                break
        else:
            raise AssertionError(f"{path}: #include \"{name}\" is not under csrc")
    return found


def _clean_copy(dest) -> str:
    """The checkout's files (tracked, or new and not ignored) copied to dest: a build here would
    reuse distill_ops.egg-info/SOURCES.txt, which lists whatever earlier builds packed."""
    r = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                       cwd=ROOT, capture_output=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    for name in filter(None, r.stdout.decode().split("\0")):
        if os.path.isfile(os.path.join(ROOT, name)):
            os.makedirs(os.path.join(dest, os.path.dirname(name)), exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), os.path.join(dest, name))
    return str(dest)


def test_sdist_holds_every_source_and_included_header(tmp_path):
    src = _clean_copy(tmp_path / "src")
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
                       cwd=src, capture_output=True, text=True,
                       env={**{k: v for k, v in os.environ.items() if k != "DISTILL_OPS_FORCE_CUDA"},
                            "DISTILL_OPS_NO_CUDA": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    # (setuptools < 69 names it distill-ops-*, later ones distill_ops-*)
    (archive,) = (tmp_path / "dist").glob("distill[-_]ops-*.tar.gz")
    with tarfile.open(archive) as tar:
        members = {m.name.split("/", 1)[1] for m in tar.getmembers() if m.isfile() and "/" in m.name}
    sources = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ROOT, "csrc")) for f in fs
               if f.endswith((".cpp", ".cu"))]
    assert sources
    needed = {os.path.relpath(s, ROOT) for s in sources}
    frontier = list(needed)  # the sources, then the headers they reach
    while frontier:
        new = _included(os.path.join(ROOT, frontier.pop())) - needed
        needed |= new
        frontier += list(new)
    missing = sorted(needed - members)
    assert not missing, f"the sdist lacks {missing}"
    assert {"setup.py", "pyproject.toml", "README.md"} <= members
