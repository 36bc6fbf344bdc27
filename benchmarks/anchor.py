#!/usr/bin/env python3
"""Build and cache the erofs-utils anchor: the current release from Debian sid's source
package, built with its own configure (the fsck.erofs oracle of the test suite and the
mkfs.erofs the benchmarks compare against).

The source comes from a private apt configuration (a sources list with only
`deb-src <mirror> sid main`, its own lists and cache directories; the mirror and the
mechanism are vm-tests/vmkernel.py's), so the machine's apt state is never touched. The
build dependencies are Debian 12's -dev packages, installed with the machine's apt.

Cache layout (root: $EROFS_ANCHOR_CACHE or /var/cache/erofs-tools-anchor):

    apt/                          private sources.list, lists/, archives/
    src/                          the downloaded .dsc/.orig/.debian and unpacked trees
    erofs-utils-<version>/bin/    mkfs.erofs, fsck.erofs, dump.erofs
    erofs-utils-<version>/info.json  Debian version, `mkfs.erofs -V`, build time

    fanotify/erofs-utils-<version>/  the --fanotify variant: the same source built with
                                  OCI + fanotify (mount.erofs -t erofs.fanotify) into
                                  bin/ and sbin/; a subdirectory, so the plain anchor's
                                  glob (erofs-utils-1.9.*) never picks it up

Command line:  benchmarks/anchor.py [--fanotify] [--refresh] [--force]
                                    [--print bin|mkfs|mount|version]
prints the anchor's bin directory (default) and logs its version on stderr. A cached
build is used without touching the network; --refresh asks sid for a newer version.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "vm-tests"))
import vmkernel  # noqa: E402  (the project's one private-apt mechanism and mirror)

CACHE_ROOT = Path(os.environ.get("EROFS_ANCHOR_CACHE", "/var/cache/erofs-tools-anchor"))
PACKAGE = "erofs-utils"
SUITE = "sid"
# The anchor is the 1.9 series; a sid upload of another series is reported, not used.
SERIES = "1.9."
SOURCES_LIST = f"deb-src [signed-by={vmkernel.KEYRING}] {vmkernel.MIRROR} {SUITE} main\n"
BUILD_DEPS = ["liblz4-dev", "liblzma-dev", "libzstd-dev", "libdeflate-dev", "uuid-dev",
              "zlib1g-dev", "libxxhash-dev", "autoconf", "automake", "libtool",
              "pkg-config", "make", "gcc"]
# Debian's own flags (debian/rules) minus what needs sid-only or network libraries
# (FUSE, OCI/S3 sources, SELinux labels, ublk, netlink, fanotify backend).
CONFIGURE_FLAGS = ["--enable-lz4", "--enable-lzma", "--enable-multithreading",
                   "--with-uuid", "--with-zlib", "--with-libdeflate", "--with-libzstd",
                   "--with-xxhash", "--disable-fuse", "--without-selinux",
                   "--disable-fanotify", "--without-libnl3", "--disable-ublk",
                   "--disable-oci", "--disable-s3"]
TOOLS = ["mkfs.erofs", "fsck.erofs", "dump.erofs"]

# The fanotify variant (issue 15's other lazy implementation): OCI registry input and the
# fanotify pre-content backend need libcurl and json-c; everything else as above.
FANOTIFY_DIR = "fanotify"
FANOTIFY_BUILD_DEPS = ["libcurl4-openssl-dev", "libjson-c-dev"]
FANOTIFY_CONFIGURE_FLAGS = [
    f for f in CONFIGURE_FLAGS if f not in ("--disable-fanotify", "--disable-oci")
] + ["--enable-oci", "--enable-fanotify", "--with-libcurl", "--with-json-c"]


class AnchorError(Exception):
    pass


def log(msg: str) -> None:
    print(f"anchor: {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def locked():
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def tool_version(binary: Path | str) -> str:
    """First line of `mkfs.erofs -V` (e.g. "mkfs.erofs (erofs-utils) 1.9.4")."""
    out = subprocess.run([str(binary), "-V"], capture_output=True, text=True)
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else f"{binary}: no version output"


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else 0 for x in re.split(r"[.\-+~]", v))


def cached_builds() -> list[Path]:
    """Complete cached builds of the anchor series, newest version last."""
    found = [d for d in CACHE_ROOT.glob(f"{PACKAGE}-{SERIES}*")
             if (d / "info.json").exists() and all((d / "bin" / t).exists() for t in TOOLS)]
    return sorted(found, key=lambda d: _version_key(d.name[len(PACKAGE) + 1:]))


def missing_build_deps(deps: list[str] = BUILD_DEPS) -> list[str]:
    missing = []
    for pkg in deps:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                             capture_output=True, text=True)
        if "install ok installed" not in out.stdout:
            missing.append(pkg)
    return missing


def install_build_deps(deps: list[str] = BUILD_DEPS) -> None:
    missing = missing_build_deps(deps)
    if not missing:
        return
    log("apt-get install " + " ".join(missing))
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "-o", "DPkg::Lock::Timeout=600", "install", "-y", "-qq", *missing],
         env=env, stdout=subprocess.DEVNULL)


def fetch_source(suffix: str = "") -> tuple[Path, str]:
    """Download sid's erofs-utils source package and unpack it; (tree, Debian version).
    suffix names a separate tree (src/erofs-utils-<version><suffix>) for a variant, so
    the plain anchor's in-tree build is left alone."""
    opts = vmkernel.apt_options(CACHE_ROOT / "apt", SOURCES_LIST)
    log(f"apt-get update (private lists in {CACHE_ROOT / 'apt'})")
    _run(["apt-get", *opts, "update"], stdout=subprocess.DEVNULL)
    show = subprocess.run(["apt-cache", *opts, "showsrc", PACKAGE], check=True,
                          capture_output=True, text=True).stdout
    versions = re.findall(r"^Version: (\S+)$", show, re.M)
    if not versions:
        raise AnchorError(f"{SUITE} has no {PACKAGE} source package")
    debversion = max(versions, key=_version_key)
    upstream = debversion.split(":")[-1].rsplit("-", 1)[0]
    if not upstream.startswith(SERIES):
        raise AnchorError(f"{SUITE} ships {PACKAGE} {debversion}, not the {SERIES}x series")
    srcdir, dsc, _ = _source_paths(debversion, suffix)
    srcdir.mkdir(parents=True, exist_ok=True)
    if not dsc.exists():
        log(f"apt-get source --download-only {PACKAGE}={debversion} ({SUITE})")
        _run(["apt-get", *opts, "source", "--download-only", f"{PACKAGE}={debversion}"],
             cwd=srcdir, stdout=subprocess.DEVNULL)
    return _unpack(debversion, suffix)


def _source_paths(debversion: str, suffix: str) -> tuple[Path, Path, Path]:
    """(source dir, the version's .dsc, the tree it unpacks into for the variant)."""
    srcdir = CACHE_ROOT / "src"
    upstream = debversion.split(":")[-1].rsplit("-", 1)[0]
    return (srcdir, srcdir / f"{PACKAGE}_{debversion.split(':')[-1]}.dsc",
            srcdir / f"{PACKAGE}-{upstream}{suffix}")


def _unpack(debversion: str, suffix: str) -> tuple[Path, str]:
    """Unpack the downloaded .dsc of debversion into a fresh tree of its own;
    (tree, Debian version)."""
    srcdir, dsc, tree = _source_paths(debversion, suffix)
    if tree.exists():
        shutil.rmtree(tree)
    # apt verified the .dsc and tarballs against the signed InRelease; dpkg-source
    # checks the tarballs against the .dsc again.
    # (Its "cannot verify inline signature" warning is noise: no uploader keyring here.)
    unpack = subprocess.run(["dpkg-source", "-x", dsc.name, tree.name], cwd=srcdir,
                            capture_output=True, text=True)
    if unpack.returncode:
        raise AnchorError(f"dpkg-source -x {dsc.name} failed: {unpack.stderr.strip()}")
    return tree, debversion


def build(tree: Path, debversion: str, fanotify: bool = False) -> Path:
    """autogen + configure + make; install into the cache; return the install dir."""
    upstream = debversion.split(":")[-1].rsplit("-", 1)[0]
    out = (CACHE_ROOT / FANOTIFY_DIR if fanotify else CACHE_ROOT) / f"{PACKAGE}-{upstream}"
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = FANOTIFY_CONFIGURE_FLAGS if fanotify else CONFIGURE_FLAGS
    logpath = tree / ".anchor-build.log"
    jobs = str((os.cpu_count() or 1) + 1)
    t0 = time.monotonic()
    with open(logpath, "w") as logf, tempfile.TemporaryDirectory(dir=CACHE_ROOT) as tmp:
        try:
            for cmd in (["./autogen.sh"],
                        ["./configure", f"--prefix={out}", *flags],
                        ["nice", "-n", "10", "make", f"-j{jobs}"],
                        ["make", "install", f"DESTDIR={tmp}"]):
                log(" ".join(cmd[:3]) + (" ..." if len(cmd) > 3 else ""))
                _run(cmd, cwd=tree, stdout=logf, stderr=subprocess.STDOUT)
        except subprocess.CalledProcessError as e:
            logf.flush()
            tail = logpath.read_text(errors="replace").splitlines()[-30:]
            raise AnchorError(f"{' '.join(e.cmd[:2])} failed; last lines of {logpath}:\n"
                              + "\n".join(tail)) from None
        staged = Path(tmp + str(out))
        for t in TOOLS:
            if not (staged / "bin" / t).exists():
                raise AnchorError(f"build installed no {t} (log {logpath})")
        if fanotify and not (staged / "sbin" / "mount.erofs").exists():
            raise AnchorError(f"build installed no sbin/mount.erofs (log {logpath})")
        version = tool_version(staged / "bin" / "mkfs.erofs")
        if upstream not in version:
            raise AnchorError(f"built mkfs.erofs says {version!r}, expected {upstream}")
        info = {
            "package": PACKAGE,
            "suite": SUITE,
            "debian_version": debversion,
            "version": version,
            "configure_flags": flags,
            "build_seconds": round(time.monotonic() - t0, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staged / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    log(f"{version} built in {info['build_seconds']:.0f} s -> {out}")
    return out


def ensure_anchor(refresh: bool = False, force: bool = False) -> Path:
    """The cached anchor's install dir (bin/ inside), built once per machine."""
    if not (refresh or force):
        builds = cached_builds()
        if builds:
            return builds[-1]
    with locked():
        builds = cached_builds()
        if builds and not (refresh or force):
            return builds[-1]
        install_build_deps()
        tree, debversion = fetch_source()
        out = CACHE_ROOT / tree.name
        if out in builds and not force:
            log(f"{out.name} is {SUITE}'s current version and already built")
            return out
        return build(tree, debversion)


def cached_fanotify_builds() -> list[Path]:
    """Complete cached builds of the fanotify variant, newest version last."""
    found = [d for d in (CACHE_ROOT / FANOTIFY_DIR).glob(f"{PACKAGE}-{SERIES}*")
             if (d / "info.json").exists() and (d / "sbin" / "mount.erofs").exists()
             and all((d / "bin" / t).exists() for t in TOOLS)]
    return sorted(found, key=lambda d: _version_key(d.name[len(PACKAGE) + 1:]))


def ensure_fanotify_anchor(force: bool = False) -> Path:
    """The fanotify variant's install dir (bin/, sbin/mount.erofs), built once from the
    same sid source as the plain anchor (which it builds first if there is none)."""
    if not force:
        builds = cached_fanotify_builds()
        if builds:
            return builds[-1]
    plain = ensure_anchor()
    with locked():
        builds = cached_fanotify_builds()
        if builds and not force:
            return builds[-1]
        install_build_deps(BUILD_DEPS + FANOTIFY_BUILD_DEPS)
        debversion = json.loads((plain / "info.json").read_text())["debian_version"]
        tree, debversion = fetch_source(suffix="-fanotify") if force else \
            _unpack_cached(debversion, "-fanotify")
        return build(tree, debversion, fanotify=True)


def _unpack_cached(debversion: str, suffix: str) -> tuple[Path, str]:
    """Unpack the already downloaded .dsc of debversion into its own tree (no network);
    falls back to fetch_source when the .dsc is gone."""
    if not _source_paths(debversion, suffix)[1].exists():
        return fetch_source(suffix)
    return _unpack(debversion, suffix)


def default_mkfs() -> Path:
    """mkfs.erofs of the newest cached anchor build (builds it if there is none)."""
    return ensure_anchor() / "bin" / "mkfs.erofs"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--refresh", action="store_true",
                    help=f"ask {SUITE} for a newer version even if one is cached")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    ap.add_argument("--fanotify", action="store_true",
                    help="the variant built with OCI + fanotify (mount.erofs "
                         "-t erofs.fanotify), in its own cache directory")
    ap.add_argument("--print", choices=["bin", "mkfs", "mount", "version"], default="bin",
                    dest="what", help="what to print on stdout (default: the bin dir)")
    args = ap.parse_args(argv)
    try:
        if args.fanotify:
            out = ensure_fanotify_anchor(force=args.force or args.refresh)
        else:
            out = ensure_anchor(refresh=args.refresh, force=args.force)
    except (AnchorError, subprocess.CalledProcessError, OSError) as e:
        log(f"error: {e}")
        return 1
    version = tool_version(out / "bin" / "mkfs.erofs")
    log(f"{version} ({out / 'bin'})")
    print({"bin": out / "bin", "mkfs": out / "bin" / "mkfs.erofs",
           "mount": out / "sbin" / "mount.erofs", "version": version}[args.what],
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
