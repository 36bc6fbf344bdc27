"""The Python/ML container image of benchmarks/coldstart_containerd.py: built once per
machine from a recipe and cached under /var/cache/erofs-tools-bench/mlimage-KEY, where
KEY is a hash of the recipe (change the recipe, get a new image; the same recipe on a
rerun takes the cached layers).

Three gzip layers, like a typical ML application image:
  1. base OS: Debian 12 minbase from debootstrap, with python3 (Debian's 3.11)
  2. python deps: torch (CPU build), numpy, scipy, pandas and what they need, installed
     by pip (the host's Python 3.11, cp311 wheels only) into /usr/local/lib/python3.11/
     dist-packages, the directory Debian's python3 searches for local packages
  3. app: /app/run.py, which imports torch, computes something and prints the result

Needs root, debootstrap (apt-get install debootstrap) and pip; the apt mirror is read
from this machine's apt sources unless --mirror names one. pip takes torch from where
pip's own configuration points (a local CPU wheel here; elsewhere pass pip the CPU
index of PyTorch through EROFS_BENCH_PIP_ARGS).
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import zlib
from pathlib import Path

CACHE = Path("/var/cache/erofs-tools-bench")
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
SITE = "usr/local/lib/python3.11/dist-packages"

APP = '''\
import time
t0 = time.perf_counter()
import torch  # noqa: E402

torch.manual_seed(0)
x = torch.randn(256, 256)
y = torch.nn.functional.relu(x @ x.T).sum().item()
print(f"torch {torch.__version__} result {y:.1f} import+compute "
      f"{time.perf_counter() - t0:.2f}s", flush=True)
'''

# Everything that decides the image's bytes. The key hashes this; edit it and the next
# run builds (and caches) a new image.
RECIPE = {
    "version": 1,
    "suite": "bookworm",
    "variant": "minbase",
    "include": ["python3"],
    # +cpu: the CPU build, never the multi-GB CUDA one pip would take for plain "torch"
    # torch, numpy, scipy, pandas make 1.4 GB in 37,000 files with the base; scikit-learn
    # and transformers (no model: the code only) bring it to the size and file count of
    # the ML images the benchmark stands for (1.7 GB, about 50,000 files)
    "pip": ["torch==2.13.0+cpu", "numpy==2.4.6", "scipy==1.17.1", "pandas==3.1.1",
            "scikit-learn==1.9.1", "transformers==5.25.0"],
    "app": APP,
    "cmd": ["python3", "/app/run.py"],
    "gzip_level": 6,
}

QUICK_RECIPE = {
    # a tiny image from the host's static busybox: for the smoke test of the benchmark
    "version": 1,
    "quick": True,
    # sleeps first: containerd 1.6's ctr can lose the whole stdout of a task that exits
    # before ctr's copy from its FIFO started (see the tests' run_out)
    "app": "sleep 1; echo quick result 42\n",
    "cmd": ["/bin/sh", "/app/run.sh"],
    "gzip_level": 6,
}


def recipe_key(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


class ImageError(Exception):
    pass


def apt_mirror(etc: Path = Path("/etc/apt")) -> str:
    """The first Debian archive URI of this machine's apt sources (deb822 or one-line)."""
    files = sorted((etc / "sources.list.d").glob("*.sources")) + \
        sorted((etc / "sources.list.d").glob("*.list")) + [etc / "sources.list"]
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        for m in re.finditer(r"^URIs:\s*(\S+)|^deb\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M):
            uri = m.group(1) or m.group(2)
            if "security" not in uri and uri.rstrip("/").endswith("/debian"):
                return uri
    raise ImageError("no Debian mirror in /etc/apt/sources*: pass --mirror URL")


def _run(cmd: list[str], log, **kw) -> None:
    log.write(f"$ {shlex.join(cmd)}\n".encode())
    log.flush()
    p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
    if p.returncode != 0:
        raise ImageError(f"{cmd[0]} failed ({p.returncode}); see {log.name}")


def _umount_under(path: Path) -> None:
    """debootstrap mounts proc/sys in the target; never delete through a mount."""
    with open("/proc/self/mounts") as f:
        mps = [line.split()[1] for line in f]
    for mp in sorted(mps, key=len, reverse=True):
        if mp == str(path) or mp.startswith(str(path) + "/"):
            subprocess.run(["umount", "-l", mp], check=False)


def _remove_tree(path: Path) -> None:
    if path.exists():
        _umount_under(path)
        subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _build_trees(recipe: dict, work: Path, mirror: str | None, log) -> list[Path]:
    """The three layer trees: base/, deps/, app/ under work."""
    base, deps, app = work / "base", work / "deps", work / "app"
    app.mkdir(parents=True)
    if recipe.get("quick"):
        busybox = shutil.which("busybox")
        if busybox is None:
            raise ImageError("busybox not installed (apt-get install busybox-static)")
        for d in ("bin", "etc", "tmp", "proc", "dev", "sys"):
            (base / d).mkdir(parents=True, exist_ok=True)
        shutil.copy(busybox, base / "bin" / "busybox")
        for a in ("sh", "cat", "echo", "sleep"):
            os.symlink("busybox", base / "bin" / a)
        (deps / "lib" / "quick").mkdir(parents=True)
        for i in range(64):
            (deps / "lib" / "quick" / f"f{i}").write_bytes(os.urandom(4096) * 8)
        (app / "app").mkdir()
        (app / "app" / "run.sh").write_text(recipe["app"])
        return [base, deps, app]
    if sys.version_info[:2] != (3, 11):
        raise ImageError(f"pip must run on Python 3.11 for the image's python3.11 "
                         f"(this is {sys.version.split()[0]})")
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap not installed (apt-get install debootstrap)")
    _run(["debootstrap", f"--variant={recipe['variant']}",
          "--include=" + ",".join(recipe["include"]), recipe["suite"], str(base),
          mirror or apt_mirror()], log)
    _umount_under(base)
    # what an image leaves out: package caches and lists, device nodes (the runtime
    # provides /dev), machine-id
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin",
                    "var/lib/apt/lists/*", "dev/*", "run/*", "tmp/*", "var/log/*.log",
                    "etc/machine-id"):
        for p in base.glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    extra = shlex.split(os.environ.get("EROFS_BENCH_PIP_ARGS", ""))
    # the image's python3.11 compiles nothing at start: pip writes the .pyc files
    # (timestamp-checked; the layer tar keeps the mtimes)
    _run([sys.executable, "-m", "pip", "install", "--no-input", "--disable-pip-version-check",
          "--only-binary=:all:", "--target", str(deps / SITE), *extra, *recipe["pip"]], log)
    shutil.rmtree(deps / SITE / "bin", ignore_errors=True)  # console scripts: unused
    (app / "app").mkdir()
    (app / "app" / "run.py").write_text(recipe["app"])
    return [base, deps, app]


def _count(tree: Path) -> tuple[int, int]:
    """(entries, bytes of regular files) below tree."""
    n = size = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        n += len(dirnames) + len(filenames)
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if not os.path.islink(os.path.join(dirpath, name)):
                size += st.st_size
    return n, size


def _layer(tree: Path, out_dir: Path, level: int, own_root: bool) -> dict:
    """tar the tree (names without ./, numeric owners; mtimes kept) and gzip it; ->
    the descriptor with the diff id of the uncompressed tar."""
    names = sorted(os.listdir(tree))
    cmd = ["tar", "--numeric-owner", "--sort=name", "--xattrs", "-C", str(tree), "-cf", "-"]
    if own_root:
        cmd[1:1] = ["--owner=0", "--group=0"]
    tmp = out_dir / "layer.tmp"
    diff, dig = hashlib.sha256(), hashlib.sha256()
    comp = zlib.compressobj(level, zlib.DEFLATED, 31)  # gzip container
    tar_bytes = 0
    with open(tmp, "wb") as out:
        p = subprocess.Popen([*cmd, "--", *names], stdout=subprocess.PIPE)
        assert p.stdout is not None
        while chunk := p.stdout.read(1 << 20):
            tar_bytes += len(chunk)
            diff.update(chunk)
            z = comp.compress(chunk)
            dig.update(z)
            out.write(z)
        z = comp.flush()
        dig.update(z)
        out.write(z)
        if p.wait() != 0:
            raise ImageError(f"tar of {tree} failed ({p.returncode})")
        out.flush()
        os.fsync(out.fileno())
    digest = "sha256:" + dig.hexdigest()
    os.rename(tmp, out_dir / digest.split(":")[1])
    entries, file_bytes = _count(tree)
    return {"mediaType": LAYER_TYPE, "digest": digest, "size": os.path.getsize(
        out_dir / digest.split(":")[1]), "diff_id": "sha256:" + diff.hexdigest(),
        "tar_bytes": tar_bytes, "entries": entries, "file_bytes": file_bytes}


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def image_dir(recipe: dict, cache: Path = CACHE) -> Path:
    return cache / f"mlimage-{recipe_key(recipe)}"


def ensure_image(recipe: dict = RECIPE, cache: Path = CACHE, mirror: str | None = None,
                 say=print) -> dict:
    """The cached image for recipe (built now if missing; concurrent callers wait on
    a lock); -> its image.json: layers (digest, size, diff_id, entries), config and
    manifest digests, the directory holding the blobs."""
    d = image_dir(recipe, cache)
    with _lock(cache / f"{d.name}.lock"):
        info_path = d / "image.json"
        if info_path.exists():
            return json.loads(info_path.read_text())
        t0 = time.monotonic()
        work = cache / f"{d.name}.build"
        _remove_tree(work)
        _remove_tree(d)
        work.mkdir(parents=True)
        blobs = d / "blobs"
        blobs.mkdir(parents=True)
        say(f"building image {d.name} (log {work}.log) ...")
        with open(f"{work}.log", "wb") as log:
            try:
                trees = _build_trees(recipe, work, mirror, log)
                layers = [_layer(t, blobs, recipe["gzip_level"], own_root=i > 0)
                          for i, t in enumerate(trees)]
            finally:
                _remove_tree(work)
        config = json.dumps({
            "architecture": "amd64", "os": "linux",
            "config": {"Cmd": recipe["cmd"], "WorkingDir": "/",
                       "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:"
                               "/sbin:/bin", "LANG=C.UTF-8"]},
            "rootfs": {"type": "layers", "diff_ids": [x["diff_id"] for x in layers]},
        }, sort_keys=True).encode()
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        (blobs / config_digest.split(":")[1]).write_bytes(config)
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config_digest,
                       "size": len(config)},
            "layers": [{k: x[k] for k in ("mediaType", "digest", "size")} for x in layers],
        }, sort_keys=True).encode()
        info = {"key": recipe_key(recipe), "recipe": recipe, "dir": str(d),
                "layers": layers, "config": config_digest,
                "manifest": manifest.decode(),
                "manifest_digest": "sha256:" + hashlib.sha256(manifest).hexdigest(),
                "entries": sum(x["entries"] for x in layers),
                "file_bytes": sum(x["file_bytes"] for x in layers),
                "tar_bytes": sum(x["tar_bytes"] for x in layers),
                "gzip_bytes": sum(x["size"] for x in layers),
                "build_s": round(time.monotonic() - t0, 1)}
        tmp = d / "image.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.rename(tmp, info_path)  # last: its presence means complete
        return info


def push(info: dict, client, repo: str, tag: str) -> str:
    """Upload the cached image to a registry (the project's client); -> its digest."""
    from erofs_tools.registry.manifest import Manifest
    blobs = Path(info["dir"]) / "blobs"
    for digest in [x["digest"] for x in info["layers"]] + [info["config"]]:
        client.push_blob(repo, str(blobs / digest.split(":")[1]), digest=digest)
    client.put_manifest(repo, tag, Manifest(info["manifest"].encode(), MANIFEST_TYPE,
                                            info["manifest_digest"]))
    return info["manifest_digest"]
