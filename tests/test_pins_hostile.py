"""Hostile chunk-info tables against the C core's pin tables (csrc/chunkmap.c through
reader.bootstrap.chunk_pin_tables, what the daemon's mount reads): they refuse what the
reader's chunk_pins refuses. Found by tools/fuzz_reader.py's `pins` check
(docs/fuzzing.md)."""
from __future__ import annotations

import struct

import pytest
from test_daemon_support import pack

from erofs_tools.errors import CorruptImageError
from erofs_tools.format import erofs as E
from erofs_tools.reader.bootstrap import chunk_pin_tables, chunk_pins
from erofs_tools.reader.image import open_image


def test_a_chunk_table_without_devices_is_refused_as_the_reader_refuses_it(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"chunk data " * 1000)
    boot = str(tmp_path / "boot")
    pack(str(src), boot, str(tmp_path / "blobs"))
    img = open_image(boot)
    assert len(img.devices) == 1 and len(chunk_pin_tables(img)[0]) >= 1
    img.close()
    # the superblock says no extra devices: every chunk-info row names a missing blob
    data = bytearray(open(boot, "rb").read())
    at = E.SUPER_OFFSET + E.SuperBlock.field_layout()["extra_devices"][0]
    struct.pack_into("<H", data, at, 0)
    if struct.unpack_from("<I", data, E.SUPER_OFFSET + 8)[0] & E.FEATURE_COMPAT_SB_CHKSUM:
        struct.pack_into("<I", data, E.CHECKSUM_FIELD, E.superblock_checksum(bytes(data[:4096])))
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(data))
    img = open_image(str(bad))
    try:
        assert img.devices == []
        with pytest.raises(CorruptImageError) as want:
            chunk_pins(img)
        # it took the table (no blob, no pins) before
        with pytest.raises(CorruptImageError) as got:
            chunk_pin_tables(img)
        assert str(got.value) == str(want.value)
        assert "the bootstrap has 0" in str(got.value) and "\n" not in str(got.value)
    finally:
        img.close()
