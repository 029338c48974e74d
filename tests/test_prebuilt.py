"""bench/prebuilt.py: an extension built ahead is used only for the sources, Python and torch it
was built from (a stale one would test old kernels on the GPU and report them as the new ones)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bench import prebuilt

ROOT = Path(prebuilt.ROOT)


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """A copy of what the build reads, a distill_ops/ to install into, and a matching .prebuilt/."""
    shutil.copy2(ROOT / "setup.py", tmp_path / "setup.py")
    shutil.copytree(ROOT / "csrc", tmp_path / "csrc")
    (tmp_path / "distill_ops").mkdir()
    pre = tmp_path / ".prebuilt"
    pre.mkdir()
    ident = prebuilt._identity()
    so = "_C" + ident["ext_suffix"]
    (pre / so).write_bytes(b"not really an extension")
    (pre / "_build_info.py").write_text("CUDA_BUILT = True\n")
    stamp = dict(ident, digest=prebuilt.source_digest(str(tmp_path)), archs="90", so=so)
    (pre / prebuilt.STAMP).write_text(json.dumps(stamp))
    monkeypatch.setattr(prebuilt, "ROOT", str(tmp_path))
    monkeypatch.setattr(prebuilt, "PREBUILT", str(pre))
    return tmp_path, so


def test_digest_covers_every_source_file(tree):
    path, _ = tree
    base = prebuilt.source_digest(str(path))
    assert base == prebuilt.source_digest(str(ROOT))   # the copy reads the same
    header = next((path / "csrc" / "include").rglob("*.h"))
    header.write_bytes(header.read_bytes() + b" ")
    assert prebuilt.source_digest(str(path)) != base
    header.write_bytes(header.read_bytes()[:-1])
    assert prebuilt.source_digest(str(path)) == base
    (path / "csrc" / "cuda" / "new.cu").write_text("")
    assert prebuilt.source_digest(str(path)) != base


def test_install_copies_a_matching_build(tree):
    path, so = tree
    assert prebuilt.install() == 0
    assert (path / "distill_ops" / so).read_bytes() == b"not really an extension"
    assert (path / "distill_ops" / "_build_info.py").exists()


@pytest.mark.parametrize("key,value", [("digest", "0" * 64), ("torch", "2.11.0+cu130-other"),
                                       ("ext_suffix", ".cpython-399-x86_64-linux-gnu.so")])
def test_install_refuses_another_build(tree, capsys, key, value):
    path, so = tree
    stamp_file = path / ".prebuilt" / prebuilt.STAMP
    stamp = json.loads(stamp_file.read_text())
    stamp[key] = value
    stamp_file.write_text(json.dumps(stamp))
    assert prebuilt.install() == 1
    assert f"built for {key}=" in capsys.readouterr().out
    assert not (path / "distill_ops" / so).exists()


def test_install_without_a_build_says_so(tree, capsys):
    path, _ = tree
    shutil.rmtree(path / ".prebuilt")
    assert prebuilt.install() == 1
    assert "no stamp.json" in capsys.readouterr().out


@pytest.mark.parametrize("argv,named", [(["build", "--archs", "sm_90"], "--archs"),
                                        (["build", "--archs", "90;"], "--archs"),
                                        (["build", "--jobs", "0"], "--jobs")])
def test_build_refuses_bad_arguments_before_building(argv, named, capsys):
    with pytest.raises(SystemExit) as exc:
        prebuilt.main(argv)
    assert exc.value.code == 2 and named in capsys.readouterr().err
