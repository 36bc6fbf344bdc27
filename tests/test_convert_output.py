"""convert/push/pull outputs and the plain-HTTP rule (issue 13 defects 7 and 8).

- Four converts into one output directory at the same time all succeed, and the
  directory ends up holding complete files only (image.boot and blobs named by their
  sha256), no temporary name any two of them share.
- One rule for plain HTTP in every command, the daemon's: loopback hosts are spoken to in
  plain HTTP by default, every other host over verified HTTPS; --insecure/--secure
  override it, and a TLS handshake with a plain-HTTP server says to pass --insecure.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
from registry_fixtures import registry  # noqa: F401  (fixture)
from test_tar_helpers import layer_paths, make_oci_layout, run_cli, sample_layers

from erofs_tools.builder.chunk_dict import BootstrapTables
from erofs_tools.registry.reference import default_insecure, is_loopback

TOOL = [sys.executable, "-m", "erofs_tools"]


def _complete_output(out):
    """image.boot is a bootstrap whose every blob is here under its own sha256."""
    names = sorted(os.listdir(out))
    blobs = BootstrapTables.read(str(out / "image.boot")).blobs
    assert names == sorted(["image.boot", *{b.blob_id for b in blobs}]), names
    for b in blobs:
        assert hashlib.sha256((out / b.blob_id).read_bytes()).hexdigest() == b.blob_id


def test_four_converts_into_one_output_directory(tmp_path):
    tars = layer_paths(tmp_path, sample_layers())
    make_oci_layout(str(tmp_path / "src"), tars)
    out = tmp_path / "out"
    for round_ in range(3):
        procs = [subprocess.Popen([*TOOL, "convert", f"oci:{tmp_path / 'src'}:v1",
                                   f"oci:{tmp_path / f'dst{round_}{i}'}:nydus", "-o",
                                   str(out), "-q"], stderr=subprocess.PIPE)
                 for i in range(4)]
        for p in procs:
            _, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        _complete_output(out)


def test_convert_output_is_written_through_no_planted_name(tmp_path):
    """A symlink at image.boot or at a blob's name is replaced, never written through."""
    tars = layer_paths(tmp_path, sample_layers()[:1])
    make_oci_layout(str(tmp_path / "src"), tars)
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    out = tmp_path / "out"
    out.mkdir()
    (out / "image.boot").symlink_to(victim)
    p = run_cli("convert", f"oci:{tmp_path / 'src'}:v1", f"oci:{tmp_path / 'dst'}:n",
                "-o", out, "--json")
    assert victim.read_bytes() == b"keep" and not (out / "image.boot").is_symlink()
    assert json.loads(p.stdout)["bootstrap"] == str(out / "image.boot")
    _complete_output(out)


def test_loopback_rule():
    assert is_loopback("127.0.0.1:5000") and is_loopback("localhost") \
        and is_loopback("[::1]:443") and is_loopback("LOCALHOST:1")
    assert not is_loopback("registry.example:5000") and not is_loopback("10.0.0.1")
    assert default_insecure("127.0.0.1:5000") is True
    assert default_insecure("registry.example") is False
    assert default_insecure("127.0.0.1:5000", False) is False
    assert default_insecure("registry.example", True) is True


@pytest.mark.registry
def test_plain_http_loopback_registry_without_flags(tmp_path, registry):  # noqa: F811
    tars = layer_paths(tmp_path, sample_layers()[:1])
    lay, _ = make_oci_layout(str(tmp_path / "layout"), tars)
    run_cli("convert", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/n/app:v1", "-q")
    run_cli("convert", f"oci:{tmp_path / 'layout'}:v1", f"oci:{tmp_path / 'l2'}:v1", "-q")
    p = run_cli("pull", f"{registry.host}/n/app:v1", "-o", tmp_path / "out", "--json")
    assert json.loads(p.stdout)["bootstrap"] == str(tmp_path / "out" / "image.boot")
    # --secure insists on HTTPS: a one-line error that says what to do instead.
    for args in (("pull", f"{registry.host}/n/app:v1", "-o", tmp_path / "o2"),
                 ("convert", f"oci:{tmp_path / 'layout'}:v1", f"{registry.host}/n/b:1", "-q"),
                 ("push", tmp_path / "out" / "image.boot", f"{registry.host}/n/c:1",
                  "-D", tmp_path / "out")):
        p = run_cli(*args, "--secure", check=False)
        err = p.stderr.decode().strip()
        assert p.returncode == 1 and len(err.splitlines()) == 1, err
        assert err.startswith("error: ") and "pass --insecure" in err, err
    assert not (tmp_path / "o2" / "image.boot").exists()
