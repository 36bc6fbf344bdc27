"""cffi build script (out-of-line API mode): compiles csrc/*.c into erofs_tools._native_cffi.

Run by setuptools at install time (setup.py: cffi_modules). The cdef is the one API header
csrc/erofs_native.h with its preprocessor lines removed; erofs_fs.h (on-disk structs)
and builder_int.h (builder internals) are included by the .c files only.
"""
import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "erofs_native.h")
SOURCES = ["nodes.c", "datastream.c", "dirs.c", "layout.c", "metapack.c", "smeta.c", "zsmeta.c", "write.c", "crc32c.c",
           "fs_table.c", "xattrs.c", "zconf.c", "compress.c", "compress_lz4.c", "compress_zstd.c", "compress_lzma.c",
           "compress_deflate.c", "zstream.c", "zdir.c", "metabox.c", "metazone.c", "zindex.c", "zlayout.c", "fragments.c",
           "dedupe.c", "decompress.c", "coldpath.c", "chunkread.c", "chunkzstd.c",
           "chunkmap.c", "walk.c", "fileruns.c", "fanhold.c", "sha256.c", "chunked.c", "imageguard.c",
           "blake3.c"]
# the compressors: Debian's liblz4-dev, libzstd-dev, liblzma-dev, libdeflate-dev
LIBRARIES = ["lz4", "zstd", "lzma", "deflate", "pthread"]


def _cdef_text():
    with open(HEADER, encoding="utf-8") as f:
        lines = [ln for ln in f if not ln.lstrip().startswith("#")]
    return "".join(lines)


def _rel(path):
    # setuptools wants source paths relative to the project directory
    try:
        return os.path.relpath(path)
    except ValueError:
        return path


# zran.c: random access into gzip layers, through zlib (Debian's zlib1g-dev)
SOURCES.extend(["zran.c", "zinfo.c"])   # zinfo.c: mkfs --gzinfo
LIBRARIES.append("z")

ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "erofs_tools._native_cffi",
    '#include "erofs_native.h"\n',
    sources=[_rel(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[_rel(HERE)],
    libraries=LIBRARIES,
    extra_compile_args=["-O2", "-std=gnu11", "-Wall"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
