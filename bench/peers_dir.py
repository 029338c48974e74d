"""python -m bench.peers_dir DEST DIST [DIST ...]: copy installed pure-Python distributions into a
folder that a GPU machine without network can put on PYTHONPATH (`make peers-dir`).

Each distribution's top-level packages are copied with its .dist-info, so that
importlib.metadata still finds its version there (the bench JSON records the peers' versions).
"""

from __future__ import annotations

import shutil
import sys
from importlib import metadata
from pathlib import Path


def copy_distribution(name: str, dest: Path) -> list[str]:
    """Copy distribution ``name``'s top-level packages and its .dist-info into ``dest``."""
    dist = metadata.distribution(name)
    root = Path(dist.locate_file(""))
    # RECORD lists every installed file, the .dist-info's own among them; ".." is bin/ (scripts)
    tops = {Path(f).parts[0] for f in dist.files or ()} - {"..", "__pycache__"}
    for top in sorted(tops):
        src = root / top
        if src.is_dir():
            shutil.copytree(src, dest / top, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / top)
    return sorted(tops)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n")[0], file=sys.stderr)
        return 2
    dest = Path(argv[0])
    dest.mkdir(parents=True, exist_ok=True)
    for name in argv[1:]:
        print(f"peers: {name} {metadata.version(name)}: {', '.join(copy_distribution(name, dest))}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
