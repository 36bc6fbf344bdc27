"""Mutated tar streams never crash the tar source: every outcome is an image or one
ErofsToolsError with a one-line message, and nothing is left behind on error."""
import io
import os
import random
import tarfile

import pytest
from test_pack_validate import validate_rafs_bootstrap
from test_tar_helpers import E, make_tar

from erofs_tools.builder.tar_source import pack_tar
from erofs_tools.errors import ErofsToolsError


def _seed_tars():
    big = bytes(range(256)) * 40
    ents = [E("d", "dir"), E("d/f", data=b"hello"), E("d/big", data=big),
            E("d/l", "symlink", link="f"), E("d/h", "hardlink", link="d/f"),
            E("d/.wh.x"), E("d/.wh..wh..opq"), E("c", "chr", rdev=(1, 3)),
            E("x" * 120, data=b"long", xattrs={"user.k": "v"})]
    out = [make_tar(ents, fmt=tarfile.PAX_FORMAT), make_tar(ents, fmt=tarfile.GNU_FORMAT)]
    out.append(make_tar(ents, gz=True))
    return out


def _mutate(rng, data):
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        if op < 0.6 and b:
            i = rng.randrange(len(b))
            b[i] = rng.randrange(256)
        elif op < 0.8 and b:
            i = rng.randrange(len(b))
            del b[i:i + rng.randint(1, 600)]
        else:
            i = rng.randrange(len(b) + 1)
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    return bytes(b)


@pytest.mark.parametrize("seed", range(4))
def test_mutated_streams_fail_cleanly(tmp_path, seed):
    rng = random.Random(1000 + seed)
    seeds = _seed_tars()
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    ok = bad = 0
    for _i in range(120):
        data = _mutate(rng, rng.choice(seeds))
        boot = tmp_path / "o.boot"
        try:
            pack_tar(io.BytesIO(data), str(boot), str(blobs), source_type="auto",
                     whiteout_spec=rng.choice(["oci", "none"]), max_size=1 << 24)
            # accepted: what was written is a valid bootstrap over complete blobs
            sizes = {n: os.path.getsize(blobs / n) for n in os.listdir(blobs)}
            validate_rafs_bootstrap(str(boot), sizes)
            ok += 1
            boot.unlink()
        except ErofsToolsError as e:
            msg = str(e)
            assert msg and "\n" not in msg, repr(msg)
            assert not boot.exists()
            bad += 1
        for n in os.listdir(blobs):          # only finished blobs, never temp files
            assert not n.startswith("."), n
            os.unlink(blobs / n)
    # both outcomes exercised (a mutator that broke nothing or everything proves little)
    assert ok > 0 and bad > 0, (ok, bad)


_FIELDS = [(0, 100), (100, 8), (108, 8), (116, 8), (124, 12), (136, 12), (156, 1),
           (157, 100), (329, 8), (337, 8), (345, 155), (482, 1), (483, 12), (386, 96)]


def _fix_checksums(b):
    for off in range(0, len(b) - 511, 512):
        blk = b[off:off + 512]
        if blk[257:262] == b"ustar":
            s = sum(blk[:148]) + 256 + sum(blk[156:])
            b[off + 148:off + 156] = b"%06o\0 " % s
    return b


def _mutate_fields(rng, data):
    """Header fields rewritten (octal, base-256, type letters, random), checksums
    fixed so the parser gets past them."""
    b = bytearray(data)
    hdrs = [o for o in range(0, len(b) - 511, 512) if b[o + 257:o + 262] == b"ustar"]
    for _ in range(rng.randint(1, 4)):
        o = rng.choice(hdrs)
        off, ln = rng.choice(_FIELDS)
        start = o + off
        r = rng.random()
        if r < 0.25:
            b[start:start + ln] = bytes(rng.randrange(256) for _ in range(ln))
        elif r < 0.5:
            v = rng.choice([0, 1, 511, 512, 1 << 33, 7777777, rng.randrange(1 << 30)])
            b[start:start + ln] = (b"%o" % v).ljust(ln, b"\0")[:ln]
        elif r < 0.6:
            b[start:start + ln] = b"\x80" + bytes(rng.randrange(256) for _ in range(ln - 1))
        elif r < 0.8:
            b[start:start + ln] = bytes([rng.choice(b"0123456789LKxgSDV7")]) * ln
        else:
            b[rng.randrange(len(b))] = rng.randrange(256)
    return bytes(_fix_checksums(b))


@pytest.mark.parametrize("seed", range(3))
def test_mutated_header_fields_fail_cleanly(tmp_path, seed):
    rng = random.Random(2000 + seed)
    seeds = _seed_tars()[:2]
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for _i in range(200):
        data = _mutate_fields(rng, rng.choice(seeds))
        boot = tmp_path / "o.boot"
        try:
            pack_tar(io.BytesIO(data), str(boot), str(blobs), source_type="tar",
                     whiteout_spec=rng.choice(["oci", "none"]), max_size=1 << 24)
            boot.unlink()
        except ErofsToolsError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
            assert not boot.exists()
        for n in os.listdir(blobs):
            assert not n.startswith("."), n
            os.unlink(blobs / n)
