"""Which image's reference a lazy mount reads through when the pull's own image is gone
and several others stand on its snapshot chain (imagerefs.py): the one containerd's
image store changed last, not the first name in sorted order. Against Debian's
containerd 1.6 (an image imported and unpacked with its overlayfs snapshotter, then
tagged and relabelled with ctr). Failed before: `reg.test/a-old/app:1` came first by
name although `reg.test/prod/app:1` was tagged after it."""

from __future__ import annotations

import hashlib
import os
import shutil
import time

import pytest

from fscache_daemon.snapshotter.imagerefs import refs_on_chain, registry_refs


def test_latest_updated_first_then_by_name():
    names = ["reg.test/b:1", "reg.test/a:1", "sha256:" + "e" * 64, "reg.test/c:1"]
    when = {"reg.test/b:1": 20.0, "reg.test/a:1": 10.0, "reg.test/c:1": 20.0}
    assert registry_refs(names, when) == ["reg.test/b:1", "reg.test/c:1", "reg.test/a:1"]
    assert registry_refs(names) == ["reg.test/a:1", "reg.test/b:1", "reg.test/c:1"]


def test_one_pulls_names_go_together_its_tag_first():
    """CRI's pull of prod/app:1 names it `prod/app:1`, then `prod/app@sha256:<m>` (and
    by its config digest) a moment later: the tag is taken, and the group is as recent
    as its latest name; another tag of that repository and manifest goes with them,
    the later first."""
    m, other = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    names = ["reg.test/old/app:1", f"reg.test/prod/app@{m}", "reg.test/prod/app:1",
             "reg.test/prod/app:0", "sha256:" + "c" * 64]
    when = {"reg.test/old/app:1": 50.0, "reg.test/prod/app:0": 10.0,
            "reg.test/prod/app:1": 100.0, f"reg.test/prod/app@{m}": 100.001}
    targets = {"reg.test/old/app:1": m, "reg.test/prod/app:0": m,
               "reg.test/prod/app:1": m, f"reg.test/prod/app@{m}": m}
    assert registry_refs(names, when, targets) == [
        "reg.test/prod/app:1", "reg.test/prod/app:0", f"reg.test/prod/app@{m}",
        "reg.test/old/app:1"]
    # another manifest (of the same layers) in that repository is a group of its own
    targets["reg.test/prod/app:0"] = other
    assert registry_refs(names, when, targets) == [
        "reg.test/prod/app:1", f"reg.test/prod/app@{m}", "reg.test/old/app:1",
        "reg.test/prod/app:0"]


@pytest.mark.root
def test_refs_on_chain_most_recently_changed_image_first():
    from containerd_fixtures import (
        Containerd,
        OciImage,
        require_containerd,
        short_tmpdir,
        tar_layer,
    )
    require_containerd()
    layer = tar_layer([("f", "file", b"shared layer\n")])
    chain = "sha256:" + hashlib.sha256(layer).hexdigest()   # one uncompressed layer
    old, new = "reg.test/a-old/app:1", "reg.test/prod/app:1"
    wd = short_tmpdir("erofs-refs-")
    ctd = Containerd(wd, {})
    try:
        OciImage([layer], ["/f"]).write_archive(os.path.join(wd, "i.tar"), old)
        ctd.ctr("image", "import", "--snapshotter", "overlayfs", os.path.join(wd, "i.tar"))
        assert refs_on_chain(ctd.sock, ctd.namespace, chain) == [old]
        time.sleep(0.01)
        ctd.ctr("image", "tag", old, new)           # the same image, tagged later
        assert refs_on_chain(ctd.sock, ctd.namespace, chain) == [new, old]
        time.sleep(0.01)
        ctd.ctr("image", "label", old, "touched=1")     # changed last now
        assert refs_on_chain(ctd.sock, ctd.namespace, chain) == [old, new]
        assert refs_on_chain(ctd.sock, ctd.namespace, "sha256:" + "0" * 64) == []
    finally:
        ctd.stop()
        shutil.rmtree(wd, ignore_errors=True)
