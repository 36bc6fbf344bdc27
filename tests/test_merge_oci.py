"""OCI-exact layer merge (issue 13 defect 2): a directory that an upper layer only
implies (it has entries below it but no entry of its own) keeps the metadata of the
layers below, as extracting the layers in order gives; a directory that no layer has
gets the documented default (0755, 0:0, mtime 0). Checked on `merge` of packed layers
and end to end through the real docker-registry (`convert`, `pull`, a kernel mount),
against GNU tar extracting the layers in order with whiteouts applied."""
import os
import stat

import pytest
from helpers import compare_trees
from registry_fixtures import registry  # noqa: F401
from test_tar_helpers import (
    MTIME,
    E,
    layer_paths,
    mounted_rafs,
    pack_tar,
    reference_rootfs,
    run_cli,
)

from erofs_tools.builder.whiteout import IMPLIED_XATTR
from erofs_tools.reader.image import Image

PRIVATE = dict(mode=0o700, uid=1000, gid=1000, mtime=MTIME + 5)


def _layers():
    lower = [
        E("home", "dir", mode=0o751, mtime=MTIME + 1),
        E("home/app", "dir", xattrs={"user.owner": "app"}, **PRIVATE),
        E("home/app/a", data=b"a", uid=1000, gid=1000),
        E("home/app/gone", data=b"gone", uid=1000, gid=1000),
        E("srv", "dir", mode=0o750, uid=5, gid=6, mtime=MTIME + 2),
        E("srv/old", data=b"old"),
        E("opt", "dir", mode=0o711, uid=7, gid=8, mtime=MTIME + 3),
    ]
    upper = [
        # no entries for home or home/app: both implied, both exist below
        E("home/app/file", data=b"new", uid=1000, gid=1000, mode=0o600),
        E("home/app/.wh.gone"),
        # implied and opaque: the layer's own children only, metadata from below
        E("srv/.wh..wh..opq"), E("srv/new", data=b"n"),
        # implied with no layer below having it: the default
        E("new/deep/file", data=b"x"),
        # an explicit directory still replaces the metadata from below
        E("opt", "dir", mode=0o755, uid=0, gid=0, mtime=MTIME + 9),
        E("opt/x", data=b"x"),
    ]
    return [lower, upper]


def _reference(tmp_path, tars):
    """GNU tar -x of each layer (whiteouts applied), then the two documented
    differences from an extraction made now: creating an entry in an existing
    directory makes tar -x (and containerd) bump its mtime to the time of extraction,
    which the image keeps at the lower layer's value; directories no layer has get
    mtime 0 instead of the time of extraction (reproducible images)."""
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    os.utime(os.path.join(ref, "home"), (MTIME + 1, MTIME + 1))
    os.utime(os.path.join(ref, "home/app"), (MTIME + 5, MTIME + 5))
    os.utime(os.path.join(ref, "srv"), (MTIME + 2, MTIME + 2))
    for d in ("new", "new/deep"):
        p = os.path.join(ref, d)
        os.chmod(p, 0o755)
        os.chown(p, 0, 0)
        os.utime(p, (0, 0))
    return ref


def _assert_oci_tree(ref, mnt):
    diffs = compare_trees(ref, mnt, check_nlink=True)
    assert not diffs, "\n".join(diffs)
    st = os.lstat(os.path.join(mnt, "home/app"))
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, st.st_mtime) == \
        (oct(0o700), 1000, 1000, MTIME + 5)
    assert os.getxattr(os.path.join(mnt, "home/app"), "user.owner") == b"app"
    st = os.lstat(os.path.join(mnt, "new/deep"))
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid, st.st_mtime) == \
        (oct(0o755), 0, 0, 0)
    assert sorted(os.listdir(os.path.join(mnt, "srv"))) == ["new"]
    assert sorted(os.listdir(os.path.join(mnt, "home/app"))) == ["a", "file"]
    for d in ("", "home", "home/app", "srv", "new"):
        assert IMPLIED_XATTR.decode() not in os.listxattr(os.path.join(mnt, d))


@pytest.mark.root
def test_merge_keeps_lower_metadata_of_implied_parents(tmp_path):
    os.umask(0o022)
    tars = layer_paths(tmp_path, _layers())
    boots = []
    for i, t in enumerate(tars):
        b = str(tmp_path / f"layer{i}.boot")
        pack_tar(t, b, tmp_path / "blobs", "--mark-implied-dirs")
        boots.append(b)
    # the upper layer marks exactly its implied directories (and the root)
    with Image(boots[1]) as img:
        marked = {p for p, _, ino in img.walk()
                  if ino.is_dir() and any(n == IMPLIED_XATTR for n, _ in img.xattrs(ino))}
    assert marked == {b"/", b"/home", b"/home/app", b"/srv", b"/new", b"/new/deep"}
    out = str(tmp_path / "merged.boot")
    run_cli("merge", *boots, "-B", out)
    ref = _reference(tmp_path, tars)
    with mounted_rafs(out, str(tmp_path / "blobs")) as mnt:
        _assert_oci_tree(ref, mnt)


@pytest.mark.root
def test_unmarked_layers_merge_as_before(tmp_path):
    """Without --mark-implied-dirs a layer's implied directories are ordinary ones (the
    documented behaviour of plain `pack --type tar`): the upper one wins."""
    tars = layer_paths(tmp_path, _layers())
    boots = []
    for i, t in enumerate(tars):
        b = str(tmp_path / f"layer{i}.boot")
        pack_tar(t, b, tmp_path / "blobs")
        boots.append(b)
    with Image(boots[1]) as img:
        assert not any(n == IMPLIED_XATTR for _, _, ino in img.walk() for n, _ in img.xattrs(ino))
    out = str(tmp_path / "merged.boot")
    run_cli("merge", *boots, "-B", out)
    with Image(out) as img:
        ino = img.lookup(b"/home/app")
        assert (ino.mode & 0o7777, ino.uid) == (0o755, 0)


@pytest.mark.root
@pytest.mark.registry
def test_convert_pull_mount_equals_layers_extracted_in_order(tmp_path, registry):  # noqa: F811
    from test_convert import _convert, _pull, _source_image
    os.umask(0o022)
    tars = _source_image(tmp_path, registry, repo="src/implied", layers=_layers())
    r = _convert(tmp_path, registry, "src/implied:v1", "nydus/implied:v1")
    assert len(r["blob_layers"]) == 2
    out = str(tmp_path / "pulled")
    _pull(tmp_path, registry, "nydus/implied:v1", out, "--blobs")
    ref = _reference(tmp_path, tars)
    with mounted_rafs(os.path.join(out, "image.boot"), out) as mnt:
        _assert_oci_tree(ref, mnt)
    c = run_cli("check", os.path.join(out, "image.boot"), "--blob-dir", out)
    assert c.returncode == 0


def test_pack_max_size_accepts_g_and_names_itself(tmp_path):
    """Issue 19 item 16 / issue 13 defect 8: --max-size takes K/M/G/T suffixes, and a
    bad value is reported as --max-size."""
    t = layer_paths(tmp_path, [[E("f", data=b"x")]])[0]
    p = pack_tar(t, tmp_path / "a.boot", tmp_path / "b", "--max-size", "1G")
    assert p.returncode == 0
    p = pack_tar(t, tmp_path / "c.boot", tmp_path / "b", "--max-size", "1Q", check=False)
    err = p.stderr.decode()
    assert p.returncode == 1 and "--max-size" in err and "--chunk-size" not in err
    assert len(err.strip().splitlines()) == 1
    p = pack_tar(t, tmp_path / "d.boot", tmp_path / "b", "--max-size", "1K", check=False)
    assert p.returncode == 1 and "--max-size" in p.stderr.decode()


def _readd_layers():
    lower = [
        E("d", "dir", mode=0o700, uid=5, gid=6), E("d/old", data=b"old"),
        E("d/sub", "dir"), E("d/sub/deep", data=b"deep"),
        E("e", "dir"), E("e/old", data=b"old"),
    ]
    upper = [
        # `rm -rf d && mkdir d`: the whiteout before the new directory (what the OCI
        # spec asks builders to write)
        E(".wh.d"), E("d", "dir", mode=0o750), E("d/new", data=b"new"),
        # the same change with the whiteout after the directory: a whiteout applies to
        # the layers below whatever its place in the layer
        E("e", "dir", mode=0o711), E("e/new", data=b"new"), E(".wh.e"),
    ]
    return [lower, upper]


@pytest.mark.root
@pytest.mark.parametrize("marked", [True, False])
def test_whiteout_then_readded_directory_hides_the_lower_one(tmp_path, marked):
    """`.wh.d` and `d/` in one layer: the layer's d replaces the d of the layers below,
    children and all (umoci raw unpack and containerd's applier remove the lower d,
    then create the new one). The whiteout was dropped because the same layer has d,
    so the lower d's entries showed through the new directory."""
    os.umask(0o022)
    tars = layer_paths(tmp_path, _readd_layers())
    boots = []
    for i, t in enumerate(tars):
        b = str(tmp_path / f"layer{i}.boot")
        pack_tar(t, b, tmp_path / "blobs", *(["--mark-implied-dirs"] if marked else []))
        boots.append(b)
    out = str(tmp_path / "merged.boot")
    run_cli("merge", *boots, "-B", out)
    ref = reference_rootfs(tars, str(tmp_path / "ref"))
    assert sorted(os.listdir(os.path.join(ref, "d"))) == ["new"]
    assert sorted(os.listdir(os.path.join(ref, "e"))) == ["new"]
    with mounted_rafs(out, str(tmp_path / "blobs")) as mnt:
        diffs = compare_trees(ref, mnt, check_nlink=True)
        assert not diffs, "\n".join(diffs)


def _symlinked_parent_layers():
    lower = [
        E("usr", "dir"), E("usr/lib", "dir", mode=0o750, uid=3, gid=4),
        E("usr/lib/old", data=b"old"), E("usr/lib/gone", data=b"gone"),
        E("lib", "symlink", link="usr/lib"),            # merged /usr, as Debian has it
        E("lib64", "symlink", link="lib"),              # a chain of symlinks
        E("usr/lib32", "symlink", link="../lib/"),      # '..' and a trailing slash
        E("abs", "symlink", link="/usr/lib"),           # absolute: inside the rootfs
        E("opt", "dir"), E("opt/f", data=b"f"),
    ]
    upper = [
        # no entries for lib, lib64, usr/lib32 or abs: the layer writes through them
        E("lib/new", data=b"new"), E("lib/.wh.gone"),
        E("lib64/sub/deep", data=b"deep"), E("usr/lib32/l32", data=b"32"),
        E("abs/a", data=b"a"),
        # an explicit directory entry still replaces a symlink (as it replaces a file)
        E("opt2", "dir"), E("opt2/x", data=b"x"),
    ]
    lower.append(E("opt2", "symlink", link="opt"))
    # a whiteout of the symlink, then entries below its name: a new directory
    lower.append(E("lib2", "symlink", link="usr/lib"))
    upper += [E(".wh.lib2"), E("lib2/y", data=b"y")]
    # a dangling symlink: the directories it names are made
    lower.append(E("dang", "symlink", link="gone/../made/dir"))
    upper.append(E("dang/z", data=b"z"))
    return [lower, upper]


@pytest.mark.root
def test_implied_directory_over_a_lower_symlink_writes_through_it(tmp_path):
    """A layer with `lib/new` but no entry for lib, over a layer where lib is a symlink
    to usr/lib (merged /usr): containerd's applier and umoci resolve an entry's parents
    in the rootfs, symlinks followed (inside it), so new lands in usr/lib and lib stays
    a symlink. merge made lib a directory holding only new, hiding usr/lib's files
    behind it."""
    os.umask(0o022)
    tars = layer_paths(tmp_path, _symlinked_parent_layers())
    boots = []
    for i, t in enumerate(tars):
        b = str(tmp_path / f"layer{i}.boot")
        pack_tar(t, b, tmp_path / "blobs", "--mark-implied-dirs")
        boots.append(b)
    out = str(tmp_path / "merged.boot")
    run_cli("merge", *boots, "-B", out)
    with mounted_rafs(out, str(tmp_path / "blobs")) as mnt:
        for link, target in (("lib", "usr/lib"), ("lib64", "lib"), ("usr/lib32", "../lib/"),
                             ("abs", "/usr/lib")):
            assert os.readlink(os.path.join(mnt, link)) == target
        lib = os.path.join(mnt, "usr/lib")
        assert sorted(os.listdir(lib)) == ["a", "l32", "new", "old", "sub"]
        st = os.lstat(lib)
        assert (st.st_mode & 0o7777, st.st_uid, st.st_gid) == (0o750, 3, 4)
        with open(os.path.join(lib, "sub/deep"), "rb") as f:
            assert f.read() == b"deep"
        assert os.path.isdir(os.path.join(mnt, "opt2"))
        assert not os.path.islink(os.path.join(mnt, "opt2"))
        assert sorted(os.listdir(os.path.join(mnt, "opt2"))) == ["x"]
        assert not os.path.islink(os.path.join(mnt, "lib2"))
        assert sorted(os.listdir(os.path.join(mnt, "lib2"))) == ["y"]
        assert os.readlink(os.path.join(mnt, "dang")) == "gone/../made/dir"
        assert not os.path.lexists(os.path.join(mnt, "gone"))
        with open(os.path.join(mnt, "made/dir/z"), "rb") as f:
            assert f.read() == b"z"
        st = os.lstat(os.path.join(mnt, "made"))
        assert (stat.S_ISDIR(st.st_mode), st.st_mode & 0o7777, st.st_uid) == (True, 0o755, 0)
