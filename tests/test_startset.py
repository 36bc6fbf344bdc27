"""The start set (fscache_daemon/startset.py): the files a container's first instructions
read, fetched at mount from what the image config and the ELF headers name."""

import json
import os
import re
import shutil
import struct
import time

import helpers
import pytest
from registry_fixtures import registry  # noqa: F401
from test_daemon_support import DaemonProc, pack, require_lazy_kernel

from erofs_tools.registry import NYDUS_BLOB, OCI_CONFIG, BlobSource, push_image
from fscache_daemon import startset

PYTHON = os.path.realpath("/usr/bin/python3")


def host_reader(path):
    with open(path, "rb") as f:
        data = f.read()
    return lambda off, n: data[off:off + n] if 0 <= off and off + n <= len(data) else None


def test_command_from_config():
    cfg = {"config": {"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["python3 /app/run.py"],
                      "Env": ["LANG=C", "PATH=/opt/bin:/usr/bin"]}}
    assert startset.command(json.dumps(cfg).encode()) == \
        (["/bin/sh", "-c", "python3 /app/run.py"], "/opt/bin:/usr/bin")
    assert startset.command(b"{}") == ([], startset.DEFAULT_PATH)
    assert startset.command(b"not json") == ([], startset.DEFAULT_PATH)
    assert startset.command(b'{"config": {"Cmd": "a string", "Env": [1]}}') == \
        ([], startset.DEFAULT_PATH)


def test_elf_needs_of_real_binaries():
    interp, needed, _ = startset.elf_needs(host_reader(PYTHON))
    assert interp and interp.startswith("/") and "ld-linux" in interp
    assert "libc.so.6" in needed
    libc = startset.ld_cache(open("/etc/ld.so.cache", "rb").read())
    assert os.path.realpath(libc["libc.so.6"]) == \
        os.path.realpath("/usr/lib/x86_64-linux-gnu/libc.so.6")


def test_pth_imports():
    pth = "/usr/lib/python3/dist-packages/distutils-precedence.pth"
    line = (b"import os; var = 'X'; enabled = os.environ.get(var, 'local') == 'local'; "
            b"enabled and __import__('_distutils_hack').add_shim(); \n# comment\n./extra\n")
    site = "/usr/lib/python3/dist-packages"
    assert startset.pth_imports(pth, line, "311") == [
        f"{site}/os/__pycache__/__init__.cpython-311.pyc",
        f"{site}/__pycache__/os.cpython-311.pyc",
        f"{site}/_distutils_hack/__pycache__/__init__.cpython-311.pyc",
        f"{site}/__pycache__/_distutils_hack.cpython-311.pyc"]
    assert startset.pth_imports(pth, line, "") == []
    assert startset.pth_imports(pth, None, "311") == []
    assert startset.pth_imports(pth, b"import ../../etc\n", "311") == []


def test_elf_needs_hostile_bytes():
    good = open(PYTHON, "rb").read()
    assert startset.elf_needs(lambda o, n: None) is None
    assert startset.elf_needs(host_reader("/etc/passwd")) is None
    # every truncation and a few corruptions: an answer or None, never an exception
    for cut in (16, 52, 64, 100, 1000, 4096):
        data = good[:cut]
        startset.elf_needs(lambda o, n, d=data: d[o:o + n] if o + n <= len(d) else None)
    bad = bytearray(good[:8192])
    struct.pack_into("<H", bad, 56, 0xffff)     # phnum
    assert startset.elf_needs(lambda o, n: bytes(bad[o:o + n])) is None
    assert startset.ld_cache(b"garbage") == {}
    assert startset.ld_cache(b"glibc-ld.so.cache1.1" + b"\xff" * 40) == {}


def _copy(src, root, dest):
    path = os.path.join(root, dest.lstrip("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    shutil.copyfile(src, path)


def container_tree(root):
    """A Debian-like tree: merged /usr, python3 -> python3.11, its real libraries."""
    lib = "/usr/lib/x86_64-linux-gnu"
    os.makedirs(os.path.join(root, "usr/bin"))
    os.makedirs(os.path.join(root, "etc"))
    _copy(PYTHON, root, "/usr/bin/" + os.path.basename(PYTHON))
    os.symlink(os.path.basename(PYTHON), os.path.join(root, "usr/bin/python3"))
    os.symlink("usr/lib", os.path.join(root, "lib"))
    os.symlink("usr/lib64", os.path.join(root, "lib64"))
    os.makedirs(os.path.join(root, "usr/lib64"))
    os.symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
               os.path.join(root, "usr/lib64/ld-linux-x86-64.so.2"))
    wanted = {"/usr/bin/" + os.path.basename(PYTHON), "/etc/passwd", "/etc/group",
              lib + "/ld-linux-x86-64.so.2"}
    for soname in ("libc.so.6", "libm.so.6", "libz.so.1", "libexpat.so.1",
                   "ld-linux-x86-64.so.2"):
        real = os.path.realpath(os.path.join(lib, soname))
        _copy(real, root, lib + "/" + os.path.basename(real))
        if os.path.basename(real) != soname:
            os.symlink(os.path.basename(real), os.path.join(root, lib.lstrip("/"), soname))
        wanted.add(lib + "/" + os.path.basename(real))
    # CPython's start: the encodings package and site's .pth files
    ver = os.path.basename(PYTHON)[len("python"):]
    tag = ver.replace(".", "")
    for rel in (f"/usr/lib/python{ver}/encodings/__pycache__/__init__.cpython-{tag}.pyc",
                f"/usr/local/lib/python{ver}/dist-packages/a.pth"):
        path = os.path.join(root, rel.lstrip("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(b"x" * 100)
        wanted.add(rel)
    with open(os.path.join(root, f"usr/local/lib/python{ver}/dist-packages/b.py"), "w") as f:
        f.write("# not read at the start\n")
    for name in ("passwd", "group"):
        with open(os.path.join(root, "etc", name), "w") as f:
            f.write(f"root:x:0:0:{name}\n")
    # not in the start set: the same libraries are not needed twice, and a big file
    with open(os.path.join(root, "other.bin"), "wb") as f:
        f.write(os.urandom(3 << 20))
    return wanted




@pytest.mark.root
@pytest.mark.registry
def test_start_set_fetched_at_mount(registry, tmp_path):  # noqa: F811
    require_lazy_kernel()
    src = str(tmp_path / "src")
    wanted = container_tree(src)
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs)
    blob_id = info["blobs"][0]["blob_id"]
    config = {"config": {"Cmd": ["python3", "-c", "pass"], "Env": ["PATH=/usr/bin"]}}
    client = registry.client()
    push_image(client, "start/app", "v1",
               config=BlobSource(json.dumps(config).encode(), OCI_CONFIG),
               layers=[BlobSource(os.path.join(blobs, blob_id), NYDUS_BLOB,
                                  {"containerd.io/snapshot/nydus-blob": "true"})])
    client.close()
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        mnt = str(tmp_path / "mnt")
        d.mount(boot, mnt, f"registry:{registry.host}/start/app:v1")
        deadline = time.monotonic() + 60
        line = None
        while time.monotonic() < deadline and line is None:
            line = re.search(r"start set of .*: (\d+) files, (\d+) bytes fetched in "
                             r"[0-9.]+ s \(rounds ended at .*? s\): (.*)", d.log(tail=400))
            time.sleep(0.05)
        assert line, d.log()
        files = set(line.group(3).split())
        assert files == wanted, (files ^ wanted)
        fetched = d.blob_metrics(blob_id)["bytes_fetched"]
        assert int(line.group(2)) > 0 and fetched > 0
        # the big unrelated file was not fetched: every byte so far is the start set's
        # (stored, compressed) plus at most one chunk of slack
        start_bytes = sum(os.path.getsize(os.path.join(src, p.lstrip("/"))) for p in files)
        assert fetched <= start_bytes + (1 << 20)
        # and what the mount serves is exact
        helpers.assert_same_tree(src, mnt)
    finally:
        d.cleanup()


@pytest.mark.root
@pytest.mark.registry
def test_start_set_off(registry, tmp_path, monkeypatch):  # noqa: F811
    """FSCACHE_DAEMON_START_SET=0: nothing fetched at mount."""
    require_lazy_kernel()
    src = str(tmp_path / "src")
    container_tree(src)
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    info = pack(src, boot, blobs)
    blob_id = info["blobs"][0]["blob_id"]
    client = registry.client()
    push_image(client, "start/off", "v1",
               config=BlobSource(b'{"config": {"Cmd": ["python3"]}}', OCI_CONFIG),
               layers=[BlobSource(os.path.join(blobs, blob_id), NYDUS_BLOB, {})])
    client.close()
    monkeypatch.setenv("FSCACHE_DAEMON_START_SET", "0")
    d = DaemonProc(str(tmp_path / "d")).start()
    try:
        mnt = str(tmp_path / "mnt")
        d.mount(boot, mnt, f"registry:{registry.host}/start/off:v1")
        time.sleep(1.0)     # what a start set would have fetched by now, at most
        assert d.blob_metrics(blob_id)["bytes_fetched"] == 0
        assert "start set" not in d.log(tail=400)
    finally:
        d.cleanup()


def test_tree_resolves_as_the_container_sees_it(tmp_path):
    """Symlinks (absolute, relative, through directories) followed inside the image;
    loops, dangling links and escapes above / end without a file."""
    src = tmp_path / "src"
    (src / "usr/bin").mkdir(parents=True)
    (src / "etc").mkdir()
    (src / "etc/passwd").write_text("root:x:0:0\n")
    (src / "usr/bin/tool").write_bytes(b"#!/bin/sh\n")
    os.symlink("usr/bin", src / "bin")
    os.symlink("/bin/tool", src / "usr/bin/abs")
    os.symlink("../../../../../etc/passwd", src / "usr/bin/up")
    os.symlink("loop2", src / "loop1")
    os.symlink("loop1", src / "loop2")
    os.symlink("/nowhere", src / "dangling")
    boot, blobs = str(tmp_path / "boot"), str(tmp_path / "blobs")
    pack(str(src), boot, blobs)
    planner = startset.Planner(boot, 1)
    try:
        tree = planner.tree
        assert tree.resolve("/bin/tool")[0] == "/usr/bin/tool"
        assert tree.resolve("/usr/bin/abs")[0] == "/usr/bin/tool"
        assert tree.resolve("/usr/bin/up")[0] == "/etc/passwd"
        assert tree.resolve("/etc/../etc/./passwd")[0] == "/etc/passwd"
        for bad in ("/loop1", "/dangling", "/etc", "/etc/passwd/x", "/missing"):
            assert tree.resolve(bad) is None, bad
        assert startset.find_executable(tree, "tool", "/nope:/bin") == "/bin/tool"
        assert startset.find_executable(tree, "tool", "relative:/nope") is None
        assert sorted(tree.listdir("/bin")) == ["abs", "tool", "up"]
        assert tree.listdir("/etc/passwd") == [] and tree.listdir("/loop1") == []
        # the first round: the fixed files the image has, each once
        assert [r[0] for r in startset._round(planner, planner.fixed() + ["/etc/passwd"])] \
            == ["/etc/passwd"]
    finally:
        planner.close()
