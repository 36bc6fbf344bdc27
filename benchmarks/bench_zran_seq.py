#!/usr/bin/env python3
"""Cold sequential read of a zran image against the converted Nydus image, side by side
in one run (root; Linux 6.14+, fanotify; docker-registry installed):

    python3 benchmarks/bench_zran_seq.py [--mib 300] [--rounds 3] [--threads 8]
                                         [--zran-span 512K] [--workdir DIR] [--json out.json]

One gzip OCI image (one layer: a tar of /usr/share and /usr/lib/python3 of this machine,
cut at --mib MiB of file data, gzip -6) pushed to a private docker-registry
(tests/registry_fixtures.py), then made into both

  converted  `erofs-tools convert` (Nydus RAFS v6: zstd chunks, 1 MiB)
  zran       `erofs-tools convert --oci-ref` (the original gzip layer + its index)

Rounds alternate the order of the ways. Each: a fresh daemon and cache (fanotify front
end, registry backend), the bootstrap mounted lazily, page cache dropped, then every
regular file read front to back in the tar's order (the order a restore or a scan
reads): wall time, bytes the daemon fetched, registry requests, the daemon's CPU seconds
during the read. Goal (issue 16): zran / converted throughput >= 0.5 (medians).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench_coldpath import proc_cpu, proc_hwm_mib
from bench_daemon import drop_caches, median, read_all, timed
from benchlib import (  # noqa: E402
    REPO,
    announce_anchors,
    child_env,
    close_report,
    goal,
    is_root,
    work_dir,
)

sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

SOURCES = ("/usr/share", "/usr/lib/python3")


def source_files(mib: int) -> tuple[list[str], list[str]]:
    """(tar members in order, regular files among them), relative to /, until MIB MiB of
    regular-file data: directories, files and symlinks in sorted walk order."""
    members: list[str] = []
    regular: list[str] = []
    total, limit = 0, mib << 20
    for top in SOURCES:
        for root, dirs, files in os.walk(top):
            dirs.sort()
            members.append(os.path.relpath(root, "/"))
            for n in sorted(files):
                p = os.path.join(root, n)
                try:
                    st = os.lstat(p)
                except OSError:
                    continue
                if os.path.isfile(p) and not os.path.islink(p):
                    if not os.access(p, os.R_OK) or total >= limit:
                        continue
                    total += st.st_size
                    regular.append(os.path.relpath(p, "/"))
                members.append(os.path.relpath(p, "/"))
            if total >= limit:
                return members, regular
    return members, regular


def make_tar(work: Path, mib: int) -> tuple[Path, list[str]]:
    tar = work / f"layer-{mib}.tar"      # kept in --workdir for the next run
    lst = work / "members.txt"
    members, regular = source_files(mib)
    if not tar.exists():
        lst.write_text("\n".join(members) + "\n")
        tmp = work / "layer.tar.tmp"
        tmp.unlink(missing_ok=True)
        subprocess.run(["tar", "-C", "/", "--no-recursion", "--format=pax", "-cf", str(tmp),
                        "-T", str(lst)], check=True)
        tmp.rename(tar)
    return tar, regular


def cli(*args: str) -> dict:
    p = subprocess.run([sys.executable, "-m", "erofs_tools", *args, "--json"],
                       capture_output=True, env=child_env())
    if p.returncode != 0:
        raise SystemExit(f"erofs-tools {args[0]} failed: {p.stderr.decode()[-2000:]}")
    return json.loads(p.stdout)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=300, help="file data in the layer (MiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=8, help="daemon worker threads")
    ap.add_argument("--zran-span", default="512K")
    ap.add_argument("--ways", default="converted,zran")
    ap.add_argument("--workdir", help="keep the tar here (default: a temp dir on /var/tmp)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if not is_root("bench_zran_seq"):
        return 2
    from registry_fixtures import start_registry
    from test_daemon_support import DaemonProc, release_holder
    from test_tar_helpers import make_oci_layout

    from erofs_tools.registry import push_from_layout

    keep = args.workdir is not None
    work = work_dir(args.workdir, "bench-zranseq-")
    anchor = announce_anchors()
    t, (tar, regular) = timed(make_tar, work, args.mib)
    print(f"tar: {len(regular)} files, {tar.stat().st_size / 1e6:.1f} MB in {t:.1f} s",
          file=sys.stderr, flush=True)
    for d in ("src", "reg", "out-conv", "out-zran", "mnt", "daemon"):
        shutil.rmtree(work / d, ignore_errors=True)
    t, (lay, m) = timed(make_oci_layout, str(work / "src"), [str(tar)])
    gz_size = m.layers()[0].size
    print(f"gzip layer: {gz_size / 1e6:.1f} MB in {t:.1f} s", file=sys.stderr, flush=True)
    reg = start_registry(str(work / "reg"))
    os.environ["DOCKER_CONFIG"] = str(work / "docker")   # no credentials of this host
    (work / "docker").mkdir(exist_ok=True)
    res: dict = {"mib": args.mib, "kernel": os.uname().release, "cpus": os.cpu_count(),
                 "anchors": anchor, "files": len(regular), "tar_bytes": tar.stat().st_size,
                 "gzip_layer_bytes": gz_size, "threads": args.threads,
                 "zran_span": args.zran_span}
    try:
        with reg.client() as c:
            push_from_layout(lay, c, "src/app", "v1")
        h = reg.host
        t, conv = timed(cli, "convert", f"{h}/src/app:v1", f"{h}/nydus/app:v1", "--insecure",
                        "-o", str(work / "out-conv"))
        res["convert_s"] = t
        del conv
        res["converted_blob_bytes"] = sum(f.stat().st_size for f in (work / "out-conv").iterdir()
                                          if f.name != "image.boot")
        t, zr = timed(cli, "convert", "--oci-ref", f"{h}/src/app:v1", f"{h}/idx/app:v1",
                      "--insecure", "--zran-span", args.zran_span, "-o",
                      str(work / "out-zran"))
        res["index_s"] = t
        res["zran_meta_bytes"] = zr["meta_bytes"]
        res["zran_bootstrap_layer_bytes"] = zr["bootstrap_layer_size"]
        print(f"convert {res['convert_s']:.1f} s, index {res['index_s']:.1f} s",
              file=sys.stderr, flush=True)
        ways = {"converted": (str(work / "out-conv" / "image.boot"), f"{h}/nydus/app:v1"),
                "zran": (str(work / "out-zran" / "image.boot"), f"{h}/idx/app:v1")}
        order0 = args.ways.split(",")
        mnt = str(work / "mnt")
        holder_sock = str(work / "daemon" / "cache" / "fdholder.sock")
        runs: dict[str, list] = {w: [] for w in order0}

        def cold(way: str):
            boot, ref = ways[way]
            ddir = work / "daemon"
            shutil.rmtree(ddir, ignore_errors=True)
            d = DaemonProc(str(ddir), threads=args.threads,
                           extra=["--log-level", "INFO"]).start()
            try:
                d.mount(boot, mnt, f"registry:{ref}")
                drop_caches()
                pid = d.proc.pid
                u0, s0 = proc_cpu(pid)
                t, n = timed(read_all, mnt, regular)
                u1, s1 = proc_cpu(pid)
                blobs = d.metrics()["blobs"]
                fetched = sum(b["bytes_fetched"] for b in blobs.values())
                reqs = sum(b["backend_requests"] for b in blobs.values())
                fails = sum(b["verify_failures"] for b in blobs.values())
                hwm = proc_hwm_mib(pid)
                d.umount(mnt)
            finally:
                d.cleanup()
                release_holder(holder_sock)
            if fails:
                raise SystemExit(f"{way}: {fails} chunks failed verification")
            return (t, n, (u1 - u0) + (s1 - s0), fetched, reqs, hwm, u1 - u0, s1 - s0)

        for i in range(args.rounds):
            for w in (order0 if i % 2 == 0 else order0[::-1]):
                r = cold(w)
                runs[w].append(r)
                print(f"round {i + 1} {w}: {r[0]:.2f} s, {r[1] / r[0] / 1e6:.1f} MB/s, "
                      f"fetched {r[3] / 1e6:.1f} MB in {r[4]} requests, daemon CPU "
                      f"{r[2]:.2f} s (user {r[6]:.2f}, sys {r[7]:.2f}), peak RSS {r[5]:.0f} MiB; loadavg "
                      f"{os.getloadavg()[0]:.2f}", file=sys.stderr, flush=True)
    finally:
        reg.stop()
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    for w, rs in runs.items():
        t, n, cpu, fetched, reqs, hwm = median(rs)[:6]
        res[f"{w}_runs_s"] = [round(r[0], 3) for r in rs]
        res[f"{w}_s"], res[f"{w}_MBps"] = t, n / t / 1e6
        res[f"{w}_read_bytes"] = n
        res[f"{w}_fetched_bytes"] = fetched
        res[f"{w}_backend_requests"] = reqs
        res[f"{w}_cpu_runs_s"] = [round(r[2], 2) for r in rs]
        res[f"{w}_user_runs_s"] = [round(r[6], 2) for r in rs]
        res[f"{w}_sys_runs_s"] = [round(r[7], 2) for r in rs]
        res[f"{w}_cpu_s"] = sorted(r[2] for r in rs)[(len(rs) - 1) // 2]
        res[f"{w}_peak_rss_MiB"] = max(r[5] for r in rs)
    print(f"\nimage: {res['files']} files, {res['tar_bytes'] / 1e6:.1f} MB tar, "
          f"{gz_size / 1e6:.1f} MB gzip layer; kernel {res['kernel']}, {res['cpus']} CPUs, "
          f"daemon threads {args.threads}, zran span {args.zran_span}")
    for w in runs:
        print(f"  {w:<9} {res[w + '_MBps']:.1f} MB/s (median of {res[w + '_runs_s']} s), "
              f"fetched {res[w + '_fetched_bytes'] / 1e6:.1f} MB in "
              f"{res[w + '_backend_requests']} requests, daemon CPU {res[w + '_cpu_s']:.2f} s, "
              f"peak RSS {res[w + '_peak_rss_MiB']:.0f} MiB")
    res["goals"] = []
    if "zran" in runs and "converted" in runs:
        res["zran_vs_converted"] = res["zran_MBps"] / res["converted_MBps"]
        res["goals"].append(goal("zran / converted cold sequential throughput, medians",
                                 res["zran_vs_converted"], ">=", 0.5))
    return close_report(res, args.json, anchor)


if __name__ == "__main__":
    sys.exit(main())
