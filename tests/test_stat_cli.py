"""`erofs-tools stat` and the CLI error contract of the read commands."""
import json
import subprocess
import sys

from helpers import NYDUS_VECTORS as NYDUS

BOOT = NYDUS / "rafs-v6-2.2.boot"
TOC_BLOB = NYDUS / "toc" / "2fa78cad554b75ac91a4a125ed148d0ddeb25efa4aaa8bd80e5dc292690a4dca"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "erofs_tools", *map(str, args)],
                          capture_output=True)


def test_stat_json_across_images():
    p = cli("stat", BOOT, BOOT, TOC_BLOB, "--blob-dir", NYDUS / "blobs", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    a, b, c = d["images"]
    assert a["files"] == 2 and a["chunks"] == 2 and a["unique_chunks"] == 2
    assert a["bytes_logical"] == 16931 + 13400
    assert a["bytes_after_compression"] == 7802
    assert a["blobs"][0]["chunk_data_bytes"] == 7802
    assert c["files"] == 3 and c["unique_chunks"] == 3
    t = d["total"]
    assert t["images"] == 3 and t["files"] == 7
    # the two copies of the vector share both chunks; the inline-meta blob shares none
    assert t["shared_chunks"] == 2 and t["shared_bytes"] == 30331
    assert t["unique_chunks"] == 5
    assert t["bytes_after_dedup_across_images"] == 30331 + c["bytes_after_dedup"]


def test_stat_text():
    p = cli("stat", BOOT)
    assert p.returncode == 0
    assert b"unique_chunks: 2" in p.stdout and b"total:" in p.stdout


def test_cli_errors_are_one_line():
    for args in (("inspect", "/etc/hostname"), ("check", "/etc/hostname"),
                 ("stat", "/etc/hostname"), ("unpack", BOOT),
                 ("unpack", BOOT, "-o", "/tmp/x", "--tar", "-"),
                 ("inspect", BOOT, "/no/such/path")):
        p = cli(*args)
        assert p.returncode == 1, args
        assert p.stderr.startswith(b"error: ") and p.stderr.count(b"\n") == 1, (args, p.stderr)
