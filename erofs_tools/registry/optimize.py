"""`erofs-tools optimize SRC_REF DST_REF --trace FILE`: optimize (builder/optimize.py) a
Nydus image in an OCI layout (`oci:PATH[:TAG]`) or a registry, and publish the result.

The source bootstrap is pulled; the blobs holding traced chunks are read where they are
(an OCI layout's blob files, linked by blob id) or, from a registry, pulled into the work
directory (only those: the other blobs are never downloaded).
The result is pushed like `push` does: the new prefetch blob is uploaded, every source
blob is referenced as it is (already in a destination that is the source repository or
layout: nothing re-uploaded; copied into another layout).
"""
from __future__ import annotations

import os
import shutil
import tempfile

from ..builder.optimize import Trace, optimize
from ..errors import CorruptImageError, InputError
from ..reader.bootstrap import BootstrapTables
from .nydus_pull import pull_nydus
from .nydus_push import push_nydus
from .oci_layout import OciLayout
from .reference import LayoutReference, parse_reference


def optimize_ref(src_ref: str, dst_ref: str, trace: Trace, *, insecure: bool | None = None,
                 platform: str | None = None, work_dir: str | None = None,
                 client_kw: dict | None = None) -> dict:
    """Optimize the Nydus image SRC_REF for `trace` and push it to DST_REF."""
    ref = parse_reference(src_ref)
    parse_reference(dst_ref)                 # a bad destination fails before any work
    tmp = tempfile.mkdtemp(prefix="erofs-optimize-", dir=work_dir)
    try:
        blob_dir = os.path.join(tmp, "blobs")
        os.makedirs(blob_dir)
        local = isinstance(ref, LayoutReference)
        # from a registry, only the blobs holding traced chunks (the others stay where
        # they are and are referenced, never downloaded)
        pulled = pull_nydus(src_ref, blob_dir, blobs=not local, insecure=insecure,
                            platform=platform, client_kw=client_kw,
                            only_blobs={b for b, _ in trace.chunks}, with_config=True)
        boot = pulled["bootstrap"]
        if isinstance(ref, LayoutReference):
            layout = OciLayout(ref.path)
            for b in BootstrapTables.read(boot).blobs:
                path = layout.blob_path("sha256:" + b.blob_id)
                if os.path.isfile(path):
                    os.symlink(os.path.abspath(path), os.path.join(blob_dir, b.blob_id))
        out = os.path.join(tmp, "optimized.boot")
        try:
            res = optimize(boot, out, blob_dir, trace)
        except (InputError, CorruptImageError) as e:
            # named by the temporary copy of the bootstrap, gone when the user reads it
            msg = str(e)
            if msg.startswith(boot):
                raise type(e)(src_ref + msg[len(boot):]) from None
            raise
        # the source's config: the optimized image runs as the source did
        pushed = push_nydus(out, blob_dir, dst_ref, insecure=insecure, platform=platform,
                            client_kw=client_kw, work_dir=tmp, config=pulled["config"])
        new_id = res["prefetch_blob"]
        pushed.update(source=src_ref, destination=dst_ref,
                      prefetch_files=res["prefetch_files"],
                      prefetch_chunks=res["prefetch_chunks"],
                      prefetch_bytes=res["prefetch_bytes"],
                      reused_chunks=res["reused_chunks"],
                      prefetch_blob=pushed.get("blob_ids", {}).get(new_id, new_id))
        return pushed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
