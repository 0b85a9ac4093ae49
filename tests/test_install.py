"""What `make install` gives a new user beside the virtualenv: tcmalloc for training, or the advice to
install it, and a line saying which (cluster/install-allocator.sh, with the package manager stubbed
so that the test sees what a fresh machine without tcmalloc gets)."""

import os
import subprocess

from conftest import REPO

SCRIPT = REPO / "cluster" / "install-allocator.sh"


def _fresh_machine(tmp_path, root: bool) -> dict:
    """PATH with an `ldconfig` that knows no tcmalloc, an `apt-get` that records its calls, and `id`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {
        "ldconfig": "exit 0",
        "apt-get": f'echo "$@" >> {tmp_path}/apt.log',
        "id": f"echo {0 if root else 1000}",
    }
    for name, body in stubs.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}


def _install(tmp_path, root: bool) -> str:
    result = subprocess.run(["sh", str(SCRIPT)], env=_fresh_machine(tmp_path, root), capture_output=True, text=True, check=True)
    return result.stdout


def test_install_gives_root_tcmalloc_and_says_so(tmp_path):
    out = _install(tmp_path, root=True)
    assert "install -y -qq --no-install-recommends libtcmalloc-minimal4" in (tmp_path / "apt.log").read_text()
    assert "allocator: tcmalloc installed; training preloads it" in out


def test_install_without_root_says_what_training_uses_and_how_to_get_tcmalloc(tmp_path):
    out = _install(tmp_path, root=False)
    assert not (tmp_path / "apt.log").exists()
    assert "training uses glibc's malloc" in out and "apt-get install libtcmalloc-minimal4" in out


def test_make_install_runs_it():
    dry = subprocess.run(["make", "-n", "-B", "install"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "sh cluster/install-allocator.sh" in dry
