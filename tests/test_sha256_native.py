"""The C core's SHA-256 (csrc/sha256.c, pack's blob id) against hashlib: both code paths
(the x86 SHA extensions where the CPU has them, and the portable C), every length
around the 64-byte block and its padding boundaries, updates split anywhere, copies."""
import hashlib
import os
import random
import sys

import pytest

from erofs_tools._native_sha256 import Sha256, accelerated, heap_bound

PATHS = [False, True]      # portable?


@pytest.mark.parametrize("portable", PATHS)
def test_one_update_every_length_near_blocks(portable):
    data = os.urandom(300)
    for n in range(len(data) + 1):
        assert Sha256(data[:n], portable=portable).digest() == \
            hashlib.sha256(data[:n]).digest(), n


@pytest.mark.parametrize("portable", PATHS)
def test_known_vectors(portable):
    # FIPS 180-4 examples
    assert Sha256(b"abc", portable=portable).hexdigest() == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert Sha256(b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq",
                  portable=portable).hexdigest() == \
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    assert Sha256(portable=portable).hexdigest() == hashlib.sha256().hexdigest()


@pytest.mark.parametrize("portable", PATHS)
def test_split_updates_and_copies(portable):
    rnd = random.Random(17)
    data = os.urandom(1 << 20 | 77)
    h, ref = Sha256(portable=portable), hashlib.sha256()
    pos = 0
    while pos < len(data):
        k = rnd.choice([0, 1, 63, 64, 65, 127, 4096, 70000, rnd.randint(0, 200)])
        piece = memoryview(data)[pos:pos + k]
        h.update(piece)
        ref.update(piece)
        pos += k
        if rnd.random() < 0.05:
            # a copy finishes on its own; the original goes on
            assert h.copy().digest() == ref.copy().digest()
            assert h.digest() == ref.digest()
    assert h.hexdigest() == ref.hexdigest()
    c = h.copy()
    c.update(b"more")
    assert h.digest() == ref.digest() != c.digest()


def test_buffer_kinds():
    data = bytearray(os.urandom(1000))
    want = hashlib.sha256(data).digest()
    assert Sha256(data).digest() == want
    assert Sha256(memoryview(data)).digest() == want
    assert Sha256(memoryview(data).cast("I")).digest() == want
    with pytest.raises(ValueError):
        Sha256(memoryview(data)[::2])


def test_accelerated_matches_the_cpu():
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        assert not accelerated()
        return
    with open("/proc/cpuinfo") as f:
        flags = next(ln for ln in f if ln.startswith("flags")).split()
    assert accelerated() == ("sha_ni" in flags and "sse4_1" in flags)


def test_heap_bound_checks_arguments():
    with pytest.raises(ValueError):
        heap_bound(0, 1 << 18)
    with pytest.raises(ValueError):
        heap_bound(1, 64 << 20)
