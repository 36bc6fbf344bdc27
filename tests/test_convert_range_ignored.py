"""convert's layer reader against a server that ignores Range (a cold pull-through
docker-registry mirror answers every blob GET with 200 and the whole blob): the layer
crosses the wire once, not again from its start for every piece."""

from __future__ import annotations

import hashlib
import os

import pytest
from test_registry_hostile import _answer, _Server

from erofs_tools.errors import CorruptImageError
from erofs_tools.registry import RegistryClient
from erofs_tools.registry.convert import _RegistryBlobReader
from erofs_tools.registry.manifest import Descriptor

pytestmark = pytest.mark.registry

LAYER = os.urandom(16 << 20)
PIECE = 1 << 20


def _whole_blob_server(blob: bytes):
    state = {"sent": 0, "gets": 0}

    def handle(h, _):
        if "/blobs/" not in h.path:
            return _answer(h, 404)
        state["gets"] += 1
        h.send_response(200)                    # Range ignored
        h.send_header("Content-Length", str(len(blob)))
        h.end_headers()
        h.close_connection = True
        try:
            for i in range(0, len(blob), 1 << 16):
                h.wfile.write(blob[i:i + (1 << 16)])
                state["sent"] += min(1 << 16, len(blob) - i)
        except OSError:
            pass                                # the client hung up
    return _Server(handle), state


def _read_all(reader) -> bytes:
    out = []
    while piece := reader.read(PIECE):
        out.append(piece)
    reader.finish()
    return b"".join(out)


def test_layer_crosses_the_wire_once_from_a_server_ignoring_range():
    srv, state = _whole_blob_server(LAYER)
    try:
        c = RegistryClient(srv.host, insecure=True, docker_config=False, retries=0)
        desc = Descriptor("application/vnd.oci.image.layer.v1.tar",
                          "sha256:" + hashlib.sha256(LAYER).hexdigest(), len(LAYER))
        r = _RegistryBlobReader(c, "app", desc, piece=PIECE)
        try:
            assert _read_all(r) == LAYER
        finally:
            r.close()
        # 16 pieces by range reads: 1 + 2 + ... + 16 MiB = 136 MiB sent; now 16 MiB
        assert state["sent"] == len(LAYER) and state["gets"] == 1, state
    finally:
        srv.stop()


def test_layer_larger_than_its_descriptor_is_refused():
    srv, _ = _whole_blob_server(LAYER)
    try:
        c = RegistryClient(srv.host, insecure=True, docker_config=False, retries=0)
        desc = Descriptor("application/vnd.oci.image.layer.v1.tar",
                          "sha256:" + hashlib.sha256(LAYER).hexdigest(), len(LAYER) - 1)
        r = _RegistryBlobReader(c, "app", desc, piece=PIECE)
        try:
            with pytest.raises(CorruptImageError):
                _read_all(r)
        finally:
            r.close()
    finally:
        srv.stop()
