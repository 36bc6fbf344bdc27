"""Build and cache the VM test kernels (tinyconfig + vm-tests/kernel-frag.config).

Kernel sources come from Debian's linux-source-<series> packages, obtained only by
downloading and unpacking the .deb with a private apt configuration (own sources list,
own lists/cache directories), so the machine's apt state is never touched and nothing
from another suite is installed.

Cache layout (root: $VMTEST_CACHE or /var/cache/erofs-tools-vm):

    apt/                       private apt sources.list, lists/, archives/
    src/linux-source-<series>/ unpacked source tree, configured and built in place
    <series>-<hash>/bzImage    the kernel (hash = fragment + build recipe)
    <series>-<hash>/config     its .config
    <series>-<hash>/info.json  Debian version, kernel release, build time

Command line:  vm-tests/vmkernel.py [--force] 6.12 6.1 /path/to/tree ...
prints the bzImage path of each.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
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
FRAGMENT = HERE / "kernel-frag.config"
# Bump when the build procedure changes in a way that changes the result.
RECIPE = "tinyconfig+frag/v1"
CACHE_ROOT = Path(os.environ.get("VMTEST_CACHE", "/var/cache/erofs-tools-vm"))
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"

# series -> (Debian suite that ships it, source package)
SERIES = {
    "6.12": ("trixie", "linux-source-6.12"),
    "6.1": ("bookworm", "linux-source-6.1"),
}
DEFAULT_KERNELS = ["6.12", "6.1"]

# The Debian mirror every private apt configuration of the project uses (also
# benchmarks/anchor.py, which fetches the erofs-utils source package from it).
MIRROR = "http://deb.debian.org/debian"
SECURITY_MIRROR = MIRROR + "-security"

SOURCES_LIST = f"""\
deb [signed-by={KEYRING}] {MIRROR} trixie main
deb [signed-by={KEYRING}] {SECURITY_MIRROR} trixie-security main
deb [signed-by={KEYRING}] {MIRROR} bookworm main
deb [signed-by={KEYRING}] {MIRROR} bookworm-updates main
deb [signed-by={KEYRING}] {SECURITY_MIRROR} bookworm-security main
"""

# Options without which the VM suite is meaningless: the build fails if one is dropped.
REQUIRED = [
    "64BIT", "SMP", "SERIAL_8250_CONSOLE", "BINFMT_SCRIPT", "DEVTMPFS", "PROC_FS",
    "SYSFS", "TMPFS", "SHMEM", "FUTEX", "EPOLL", "EVENTFD", "AIO", "UNIX", "INET",
    "VIRTIO_PCI", "NET_9P_VIRTIO", "9P_FS", "VIRTIO_BLK", "BLK_DEV_LOOP", "EXT4_FS",
    "EROFS_FS", "EROFS_FS_XATTR", "EROFS_FS_ONDEMAND", "FSCACHE", "CACHEFILES",
    "CACHEFILES_ONDEMAND", "FANOTIFY", "FANOTIFY_ACCESS_PERMISSIONS",
    # containerd's default spec (vm-tests/tests/test_containerd.py: `ctr run`)
    "NAMESPACES", "UTS_NS", "IPC_NS", "PID_NS", "NET_NS", "CGROUPS", "CGROUP_SCHED",
    "FAIR_GROUP_SCHED", "BPF_SYSCALL", "CGROUP_BPF",
]


def log(msg: str) -> None:
    print(f"vmkernel: {msg}", file=sys.stderr, flush=True)


class KernelError(Exception):
    pass


def fragments(series: str | None) -> list[Path]:
    """The common fragment plus kernel-frag-<series>.config if there is one."""
    extra = HERE / f"kernel-frag-{series}.config"
    return [FRAGMENT] + ([extra] if series and extra.exists() else [])


def fragment_hash(series: str | None = None) -> str:
    h = hashlib.sha256(RECIPE.encode() + b"\0" + FRAGMENT.read_bytes())
    for f in fragments(series)[1:]:
        h.update(b"\0" + f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def fragment_options(series: str | None = None) -> dict[str, str]:
    opts = {}
    text = "\n".join(f.read_text() for f in fragments(series))
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line.strip())
        if m:
            opts[m.group(1)] = m.group(2)
        m = re.match(r"^# (CONFIG_\w+) is not set$", line.strip())
        if m:
            opts[m.group(1)] = "n"
    return opts


def cache_dir(series: str) -> Path:
    return CACHE_ROOT / f"{series}-{fragment_hash(series)}"


@contextlib.contextmanager
def locked(name: str):
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(CACHE_ROOT / f".lock-{name}", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


# ---------------------------------------------------------------- sources

def apt_options(d: Path | None = None, sources: str = SOURCES_LIST) -> list[str]:
    """apt-get options for a private configuration in d (own sources list, lists and
    cache), leaving the machine's apt state untouched."""
    d = d or CACHE_ROOT / "apt"
    (d / "lists" / "partial").mkdir(parents=True, exist_ok=True)
    (d / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    (d / "empty.d").mkdir(exist_ok=True)
    (d / "sources.list").write_text(sources)
    return [
        "-o", f"Dir::Etc::sourcelist={d / 'sources.list'}",
        "-o", f"Dir::Etc::sourceparts={d / 'empty.d'}",
        "-o", f"Dir::Etc::preferencesparts={d / 'empty.d'}",
        "-o", f"Dir::State::Lists={d / 'lists'}",
        "-o", f"Dir::Cache={d}",
        "-o", f"Dir::Cache::archives={d / 'archives'}",
        "-o", "Dir::Cache::pkgcache=",
        "-o", "Dir::Cache::srcpkgcache=",
        "-o", "APT::Get::List-Cleanup=0",
        "-o", "Acquire::Languages=none",
        "-o", "APT::Sandbox::User=root",
        "-q",
    ]


def fetch_source(series: str) -> Path:
    """Download linux-source-<series> and unpack its tarball; return the tree."""
    suite, package = SERIES[series]
    tree = CACHE_ROOT / "src" / package
    if (tree / "Makefile").exists() and (tree / ".vmtest-debversion").exists():
        return tree
    opts = apt_options()
    log(f"apt-get update (private lists in {CACHE_ROOT / 'apt'})")
    _run(["apt-get", *opts, "update"], stdout=subprocess.DEVNULL)
    debdir = CACHE_ROOT / "debs"
    debdir.mkdir(parents=True, exist_ok=True)
    log(f"apt-get download {package} ({suite})")
    _run(["apt-get", *opts, "download", package], cwd=debdir)
    debs = sorted(debdir.glob(f"{package}_*_all.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise KernelError(f"apt-get download left no {package} .deb in {debdir}")
    deb = debs[-1]
    debversion = deb.name.split("_")[1]
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(dir=CACHE_ROOT) as tmp:
        _run(["dpkg-deb", "-x", str(deb), tmp])
        tarballs = list(Path(tmp, "usr/src").glob("linux-source-*.tar.*"))
        if len(tarballs) != 1:
            raise KernelError(f"{deb}: expected one linux-source tarball, found {tarballs}")
        unpack = Path(tmp) / "tree"
        unpack.mkdir()
        _run(["tar", "-xf", str(tarballs[0]), "-C", str(unpack)])
        (top,) = list(unpack.iterdir())
        if tree.exists():
            shutil.rmtree(tree)
        tree.parent.mkdir(parents=True, exist_ok=True)
        os.replace(top, tree)
    (tree / ".vmtest-debversion").write_text(debversion + "\n")
    log(f"unpacked {deb.name} into {tree} in {time.monotonic() - t0:.0f} s")
    return tree


# ---------------------------------------------------------------- build

def read_config(path: Path) -> dict[str, str]:
    cfg = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            cfg[m.group(1)] = m.group(2)
    return cfg


def make_cmd(tree: Path, *targets: str, jobs: int | None = None) -> list[str]:
    cmd = ["nice", "-n", "10", "make", "-C", str(tree), "-s"]
    if jobs:
        cmd.append(f"-j{jobs}")
    return cmd + list(targets)


def tree_series(tree: Path) -> str:
    """"<VERSION>.<PATCHLEVEL>" from a kernel tree's Makefile."""
    head = (tree / "Makefile").read_text(errors="replace")[:2000]
    v = re.search(r"^VERSION\s*=\s*(\d+)", head, re.M)
    p = re.search(r"^PATCHLEVEL\s*=\s*(\d+)", head, re.M)
    return f"{v.group(1)}.{p.group(1)}" if v and p else ""


def configure(tree: Path, series: str, logf) -> None:
    frag = fragment_options(series)
    _run(make_cmd(tree, "tinyconfig"), stdout=logf, stderr=subprocess.STDOUT)
    _run([str(tree / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(tree),
          str(tree / ".config"), *map(str, fragments(series))], cwd=tree, stdout=logf,
         stderr=subprocess.STDOUT)
    _run(make_cmd(tree, "olddefconfig"), stdout=logf, stderr=subprocess.STDOUT)
    cfg = read_config(tree / ".config")
    missing_req = [f"CONFIG_{o}" for o in REQUIRED if cfg.get(f"CONFIG_{o}") != "y"]
    if missing_req:
        raise KernelError(f"{tree}: required options not set after olddefconfig: "
                          + " ".join(missing_req))
    dropped = [k for k, v in frag.items() if v != "n" and cfg.get(k) != v]
    if dropped:
        log("options of the fragment this kernel does not take: " + " ".join(dropped))


def build_tree(tree: Path, jobs: int | None = None) -> tuple[Path, float]:
    """Configure (if the fragment changed) and build bzImage in a kernel tree."""
    tree = tree.resolve()
    if not (tree / "Makefile").exists() or not (tree / "Kconfig").exists():
        raise KernelError(f"{tree}: not a kernel source tree")
    jobs = jobs or (os.cpu_count() or 1) + 1
    series = tree_series(tree)
    fhash = fragment_hash(series)
    stamp = tree / ".vmtest-frag-hash"
    logpath = tree / ".vmtest-build.log"
    t0 = time.monotonic()
    with open(logpath, "w") as logf:
        try:
            if not stamp.exists() or stamp.read_text().strip() != fhash \
                    or not (tree / ".config").exists():
                names = " + ".join(f.name for f in fragments(series))
                log(f"configuring {tree} (tinyconfig + {names})")
                configure(tree, series, logf)
                stamp.write_text(fhash + "\n")
            log(f"building bzImage in {tree} (nice -n 10 make -j{jobs}; log {logpath})")
            _run(make_cmd(tree, "bzImage", jobs=jobs), stdout=logf,
                 stderr=subprocess.STDOUT)
        except subprocess.CalledProcessError as e:
            logf.flush()
            tail = logpath.read_text(errors="replace").splitlines()[-40:]
            raise KernelError(f"kernel build failed ({e.cmd[3:6]}...); last lines of "
                              f"{logpath}:\n" + "\n".join(tail)) from None
    return tree / "arch/x86/boot/bzImage", time.monotonic() - t0


def kernel_release(tree: Path) -> str:
    out = subprocess.run(["make", "-C", str(tree), "-s", "kernelrelease"],
                         capture_output=True, text=True)
    return out.stdout.strip()


def ensure_series(series: str, force: bool = False) -> Path:
    """Return the cached bzImage for a Debian series, building it once per machine."""
    out = cache_dir(series)
    image = out / "bzImage"
    if image.exists() and not force:
        return image
    with locked(series):
        if image.exists() and not force:
            return image
        t0 = time.monotonic()
        tree = fetch_source(series)
        fetch_s = time.monotonic() - t0
        built, build_s = build_tree(tree)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tree / ".config", out / "config")
        info = {
            "series": series,
            "package": SERIES[series][1],
            "debian_version": (tree / ".vmtest-debversion").read_text().strip(),
            "kernelrelease": kernel_release(tree),
            "fragment_hash": fragment_hash(series),
            "fetch_seconds": round(fetch_s, 1),
            "build_seconds": round(build_s, 1),
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "cpus": os.cpu_count(),
        }
        (out / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        tmp = out / "bzImage.tmp"
        shutil.copy2(built, tmp)
        os.replace(tmp, image)
        log(f"{series}: {info['kernelrelease']} built in {build_s:.0f} s -> {image}")
        return image


def resolve_kernel(spec: str, force: bool = False) -> Path:
    """A series name (6.12, 6.1), a kernel source tree, or a prebuilt bzImage."""
    if spec in SERIES:
        return ensure_series(spec, force=force)
    p = Path(spec)
    if p.is_file():
        return p.resolve()
    if p.is_dir():
        with locked("tree-" + hashlib.sha256(str(p.resolve()).encode()).hexdigest()[:12]):
            image, secs = build_tree(p)
        log(f"{p}: bzImage ready ({secs:.0f} s)")
        return image
    raise KernelError(f"{spec}: not a known kernel series ({', '.join(SERIES)}), "
                      "kernel source tree or bzImage")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kernels", nargs="*", default=DEFAULT_KERNELS)
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    rc = 0
    for k in args.kernels:
        try:
            print(resolve_kernel(k, force=args.force), flush=True)
        except (KernelError, subprocess.CalledProcessError) as e:
            log(f"{k}: {e}")
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
