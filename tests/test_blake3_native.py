"""The C core's own BLAKE3 (csrc/blake3.c, hash mode only) against the blake3 package:
every input length 0..4200 (every block and chunk boundary of the first four chunks),
the tree's shapes around powers of two of chunks, and random bigger inputs; and the
chunk reader's digests (small chunks hashed in the read's call, the others left for
the package)."""
import array
import os
import random

import blake3
import pytest

from erofs_tools._native_chunkio import blake3_digest, blake3_digest_pair, read_chunks
from erofs_tools.builder import chunker


def test_every_length_to_4200():
    data = random.Random(17).randbytes(4200)
    for n in range(4201):
        assert blake3_digest(data[:n]) == blake3.blake3(data[:n]).digest(), n


def test_tree_shapes_and_random_lengths():
    rnd = random.Random(23)
    lengths = {1024 * k + d for k in (2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 64, 65,
                                      127, 128, 129, 1024, 1025) for d in (-1, 0, 1)}
    lengths |= {rnd.randrange(4200, 3 << 20) for _ in range(24)}
    for n in sorted(lengths):
        data = rnd.randbytes(n)
        assert blake3_digest(data) == blake3.blake3(data).digest(), n


def test_pairs_side_by_side():
    """ern_blake3_2 (two inputs of at most 1 KiB hashed side by side, the longer one's
    last blocks alone; longer inputs one after the other): each one's own digest, for
    every pair of lengths around the block boundaries and the empty input."""
    data = random.Random(29).randbytes(2 * 4200)
    lengths = sorted({0, 1, 2, 1024, 1025, 2048, 4096}
                     | {64 * k + d for k in range(1, 17) for d in (-1, 0, 1)})
    for n in lengths:
        for m in lengths:
            a, b = data[:n], data[4200:4200 + m]
            assert blake3_digest_pair(a, b) == (blake3.blake3(a).digest(),
                                                blake3.blake3(b).digest()), (n, m)


def test_known_answers():
    # the BLAKE3 specification's empty input, and a view that is not a bytes object
    assert blake3_digest(b"").hex() == \
        "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    buf = bytearray(range(256)) * 9
    assert blake3_digest(memoryview(buf)[5:2000]) == blake3.blake3(buf[5:2000]).digest()


@pytest.mark.parametrize("hash_max", [0, 1024, 4096])
def test_read_chunks_hashes_the_small_chunks(tmp_path, hash_max):
    # the chunks of at most 1 KiB are hashed two at a time: one of them held across
    # bigger ones, and the last one left alone
    sizes = [0, 1, 1023, 1025, 1024, 4095, 4096, 4097, 70_000, 64, 100, 700]
    names = bytearray()
    name_off, file_off = array.array("I"), array.array("Q")
    lengths, buf_off = array.array("I"), array.array("Q")
    datas = []
    pos = 0
    for i, n in enumerate(sizes):
        p = tmp_path / f"f{i}"
        d = os.urandom(n)
        p.write_bytes(d)
        datas.append(d)
        name_off.append(len(names))
        names += os.fsencode(p) + b"\0"
        file_off.append(0)
        lengths.append(n)
        buf_off.append(pos)
        pos += n
    buf = bytearray(pos)
    digests = bytearray(b"\xaa" * 32 * len(sizes))
    read_chunks(bytes(names), name_off, file_off, lengths, buf_off, buf, hash_max, digests)
    for i, d in enumerate(datas):
        got = bytes(digests[32 * i:32 * i + 32])
        if len(d) <= hash_max:
            assert got == blake3.blake3(d).digest(), len(d)
        else:       # left for the caller
            assert got == b"\xaa" * 32, len(d)
    with pytest.raises(ValueError):
        read_chunks(bytes(names), name_off, file_off, lengths, buf_off, buf, 1, bytearray(31))


@pytest.mark.parametrize("compressor", ["zstd", "none"])
def test_pipeline_digests_across_the_threshold(tmp_path, compressor):
    """Chunks on both sides of SMALL_HASH_MAX, in one batch and sparse: the package's
    digests, whichever hashed them."""
    m = chunker.SMALL_HASH_MAX
    files = []
    cs = 65536
    sizes = [0, 1, m - 1, m, m + 1, 3 * m, 5000, 70000]
    for i, n in enumerate(sizes):
        p = tmp_path / f"f{i}"
        p.write_bytes(os.urandom(n))
        files.append((i, str(p), n, False))
    sp = tmp_path / "sparse"
    with open(sp, "wb") as f:
        f.write(os.urandom(3000))
        f.seek(3 * cs)
        f.write(os.urandom(100))
    files.append((99, str(sp), os.path.getsize(sp), True))
    pipe = chunker.ChunkPipeline(cs, "blake3", compressor, workers=2)
    seen = 0
    for r in pipe.run(files):
        path = next(p for k, p, _, _ in files if k == r.file_key)
        with open(path, "rb") as f:
            f.seek(r.file_offset)
            data = f.read(r.size)
        assert r.digest == blake3.blake3(data).digest(), (path, r.file_offset)
        seen += 1
    # the empty file has no chunk; the sparse one 4, two of them holes
    assert seen == sum(-(-n // cs) for n in sizes) + 4
