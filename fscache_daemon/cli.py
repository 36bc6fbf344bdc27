"""fscache-daemon command line: `run` (the daemon, foreground) and the one-liners that talk
to it over the API socket: `mount`, `umount`, `status`, `trace`.

Every command takes `--api-sock` (env FSCACHE_DAEMON_API_SOCK, default
/run/fscache-daemon/api.sock); `run` and `mount` take `--cache-dir` (env
FSCACHE_DAEMON_CACHE_DIR, default /var/lib/fscache-daemon). `mount` starts a daemon in
the background (its log in CACHE_DIR/daemon.log) if none answers on the socket.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import click

from erofs_tools.errors import ErofsToolsError, run_console
from fscache_daemon import __version__
from fscache_daemon.errors import DaemonError

DEFAULT_CACHE_DIR = "/var/lib/fscache-daemon"
DEFAULT_API_SOCK = "/run/fscache-daemon/api.sock"
# containerd's: one place to say which mirror serves which registry for both
DEFAULT_HOSTS_DIR = "/etc/containerd/certs.d"
DEFAULT_CONFIG = "/etc/fscache-daemon/config.toml"
FRONTENDS = ["auto", "fanotify", "cachefiles", "none"]

log = logging.getLogger("fscache_daemon")

sock_option = click.option("--api-sock", envvar="FSCACHE_DAEMON_API_SOCK",
                           default=DEFAULT_API_SOCK, show_default=True,
                           type=click.Path(dir_okay=False),
                           help="Unix socket of the management API.")
cache_option = click.option("--cache-dir", envvar="FSCACHE_DAEMON_CACHE_DIR",
                            default=DEFAULT_CACHE_DIR, show_default=True,
                            type=click.Path(file_okay=False),
                            help="Cache files, chunk state, chunk maps and mounts.json.")


def _size(text: str) -> int:
    t = text.strip().lower()
    mult = 1
    for suffix, m in (("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30)):
        if t.endswith(suffix) or t.endswith(suffix + "ib") or t.endswith(suffix + "b"):
            mult = m
            t = t.rstrip("ib").rstrip(suffix)
            break
    try:
        v = int(float(t) * mult)
    except ValueError:
        raise click.BadParameter(f"not a size: {text!r}") from None
    if v < 0:
        raise click.BadParameter(f"negative size {text!r}")
    return v


def _hosts_dir(path: str) -> str | None:
    """The hosts directory to use: none for '', none (quietly) for a missing default."""
    if not path or (path == DEFAULT_HOSTS_DIR and not os.path.isdir(path)):
        return None
    if not os.path.isdir(path):
        raise click.BadParameter(f"{path}: no such directory", param_hint="--hosts-dir")
    return os.path.abspath(path)


def _containerd_config(path: str, hosts: str | None) -> tuple[str, str | None]:
    """Check containerd's config file now (a broken one is a start-up error, not a
    failed mount later); its `config_path` is the hosts directory unless `--hosts-dir`
    was given (on the command line or in the daemon's config file)."""
    from erofs_tools.registry.cri_config import load_cri_config
    path = os.path.abspath(path)
    try:
        cfg = load_cri_config(path)
    except ErofsToolsError as e:
        raise click.BadParameter(str(e), param_hint="--containerd-config") from None
    ctx = click.get_current_context()
    if cfg.config_path and ctx.get_parameter_source("hosts_dir") == \
            click.core.ParameterSource.DEFAULT:
        hosts = cfg.config_path
    log.info("registry credentials for %d host(s) from %s; hosts directory %s",
             len(cfg.auths), path, hosts or "none")
    return path, hosts


def _load_config(ctx: click.Context, _param: click.Parameter, path: str | None) -> None:
    """`run --config FILE`: a TOML file whose keys are run's long options (`cache-size =
    "20G"`, `snapshotter-socket = "..."`, `insecure-registry = ["host"]`; `_` or `-`).
    They become the options' defaults, so a flag on the command line still wins. The
    default file is read only if it exists; a named one must."""
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG):
            return
        path = DEFAULT_CONFIG
    import tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise click.BadParameter(f"{path}: {e.strerror}", param_hint="--config") from None
    except tomllib.TOMLDecodeError as e:
        raise click.BadParameter(f"{path}: {e}", param_hint="--config") from None
    assert isinstance(ctx.command, click.Command)
    names = {p.name for p in ctx.command.params if p.name not in (None, "config")}
    defaults = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in names:
            raise click.BadParameter(f"{path}: unknown key {key!r}", param_hint="--config")
        if isinstance(value, dict):
            raise click.BadParameter(f"{path}: {key} must be a value, not a table",
                                     param_hint="--config")
        defaults[name] = str(value) if isinstance(value, (int, float)) and \
            not isinstance(value, bool) else value
    ctx.default_map = {**(ctx.default_map or {}), **defaults}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="fscache-daemon")
def cli():
    """On-demand daemon for lazily mounted RAFS v6 (Nydus) images."""


@cli.command()
@click.option("--config", type=click.Path(dir_okay=False), default=None,
              envvar="FSCACHE_DAEMON_CONFIG", is_eager=True, expose_value=False,
              callback=_load_config,
              help=f"TOML file of run's options (keys as the long options); flags win. "
                   f"Default: {DEFAULT_CONFIG} if it exists.")
@cache_option
@sock_option
@click.option("--frontend", type=click.Choice(FRONTENDS), default="auto", show_default=True,
              help="Kernel interface: fanotify pre-content (6.14+), cachefiles on-demand, "
                   "auto (fanotify if the kernel has it, else cachefiles), none (no kernel; "
                   "for tests).")
@click.option("--threads", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Worker threads serving kernel requests and prefetch.")
@click.option("--batch-size", default="1M", show_default=True,
              help="Largest merged backend request (bytes; k/M/G suffixes).")
@click.option("--prefetch-rate", default="64M", show_default=True,
              help="Prefetch bandwidth limit in bytes/s (0: unlimited).")
@click.option("--readahead", default="64M", show_default=True,
              help="Largest readahead window: data fetched ahead of a reader, in bytes "
                   "(windows start at 2M and double while the reader keeps up; a miss "
                   "brings at most 16M of its file; 0: off).")
@click.option("--fetch-deadline", type=click.FloatRange(0.1, 3600), default=None,
              help="Seconds a registry blob read may spend retrying before the reader gets "
                   "EIO (default 60).")
@click.option("--snapshotter-socket", type=click.Path(dir_okay=False), default=None,
              help="Also serve containerd's snapshots API (a proxy plugin) on this unix "
                   "socket; see docs/snapshotter.md.")
@click.option("--snapshotter-root", type=click.Path(file_okay=False), default=None,
              help="Snapshot metadata and directories (default CACHE_DIR/snapshotter).")
@click.option("--insecure-registry", multiple=True, metavar="HOST",
              help="Snapshotter: fetch this registry's blobs over plain HTTP (repeatable).")
@click.option("--hosts-dir", default=DEFAULT_HOSTS_DIR, show_default=True,
              type=click.Path(file_okay=False),
              help="containerd's hosts directory (DIR/<host>/hosts.toml): mirrors, plain "
                   "HTTP and TLS settings per registry for registry backends ('' : none).")
@click.option("--containerd-config", default="", metavar="PATH",
              type=click.Path(dir_okay=False),
              help="containerd's config.toml: registry credentials of its CRI plugin "
                   "(registry.configs.\"HOST\".auth) for the hosts they name, and its "
                   "config_path as the hosts directory unless --hosts-dir is given.")
@click.option("--image-service-socket", type=click.Path(dir_okay=False), default=None,
              help="Also serve the Kubernetes CRI image service on this unix socket, "
                   "forwarded to containerd (--cri-address), keeping the pull secrets "
                   "kubelet sends for the lazy reads of those images (kubelet's "
                   "--image-service-endpoint); see docs/snapshotter.md.")
@click.option("--cri-address", default="/run/containerd/containerd.sock", show_default=True,
              type=click.Path(dir_okay=False),
              help="containerd's socket: the image service is forwarded to it, and the "
                   "snapshotter asks it which images stand on a Nydus image's layers.")
@click.option("--cache-size", default=None, metavar="SIZE",
              help="Limit of the blob cache on disk (k/M/G suffixes): blobs no mounted "
                   "image uses are evicted, least recently used first (default: no limit).")
@click.option("--trace-window", type=click.FloatRange(0, 86400), default=120.0,
              show_default=True,
              help="Seconds a blob that fetching completed stays watched for its access "
                   "trace while some of it was never read (warm reads of a watched blob "
                   "cost an event each; 0: unwatched at once, traces may miss reads).")
@click.option("--log-level", default="INFO", show_default=True,
              type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False))
def run(cache_dir, api_sock, frontend, threads, batch_size, prefetch_rate, readahead,
        fetch_deadline, snapshotter_socket, snapshotter_root, insecure_registry, hosts_dir,
        containerd_config, image_service_socket, cri_address, cache_size, trace_window,
        log_level):
    """Run the daemon in the foreground (logs to stderr).

    SIGTERM/SIGINT stop it cleanly: the API closes, chunk state is flushed, and mounts
    stay mounted. With the fanotify front end the fd holder keeps the mounts safe:
    reads of cached data go on, reads of uncached ranges wait until a daemon runs again
    (a restarted daemon picks up every mount from CACHE_DIR/mounts.json; there is no
    separate restore option: after a crash or SIGKILL, start it again with the same
    options, and with --snapshotter-socket the snapshot state and its lazy mounts come
    back too).
    """
    from fscache_daemon.api import ApiServer
    from fscache_daemon.daemon import Daemon
    from fscache_daemon.memory import bound_heap_arenas

    bound_heap_arenas()     # before the worker threads allocate anything
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s")
    hosts = _hosts_dir(hosts_dir)
    if containerd_config:
        containerd_config, hosts = _containerd_config(containerd_config, hosts)
    d = Daemon(cache_dir, frontend=frontend, threads=threads, batch_size=_size(batch_size),
               prefetch_rate=_size(prefetch_rate), readahead=_size(readahead),
               fetch_deadline=fetch_deadline, hosts_dir=hosts,
               cache_size=None if cache_size is None else _size(cache_size),
               trace_window=trace_window, containerd_config=containerd_config or None)
    api = ApiServer(d, api_sock)
    stop = threading.Event()

    def on_signal(signum, _frame):
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    snapshots = proxy = None
    try:
        d.start()
        api.start()
        if image_service_socket:
            from fscache_daemon.snapshotter.image_proxy import serve_image_proxy
            proxy = serve_image_proxy(image_service_socket, cri_address, d.keychain)
        if snapshotter_socket:
            # one process holds the mounts, the cache and the snapshot state: the
            # snapshotter reaches the daemon through its API socket like any client
            from fscache_daemon.snapshotter import serve
            snapshots = serve(os.path.abspath(snapshotter_socket),
                              os.path.abspath(snapshotter_root or
                                              os.path.join(d.cache_dir, "snapshotter")),
                              daemon_api=os.path.abspath(api_sock),
                              insecure_registries=tuple(insecure_registry),
                              containerd_address=cri_address)
            d.metric_sources["snapshotter"] = snapshots.metrics
        # what starting made (modules, the front end, the servers) lives as long as the
        # process: out of the cyclic collector's full passes (each walked all of it,
        # ~0.1 s of an ML cold start's daemon CPU); mounts freeze theirs (lifecycle)
        gc.collect()
        gc.freeze()
        while not stop.is_set() and not api.shutdown_requested.is_set():
            stop.wait(0.2)
    finally:
        if proxy is not None:
            proxy.stop()
        if snapshots is not None:
            snapshots.stop()
        api.stop()
        d.shutdown()
    return 0


def _client(api_sock):
    from fscache_daemon.api import ApiClient
    return ApiClient(api_sock)


def start_daemon(api_sock: str, cache_dir: str, frontend: str = "auto",
                 timeout: float = 120.0, extra_args=()) -> int:
    """Start `fscache-daemon run` in the background, detached; wait for its socket (as
    long as it lives, up to `timeout` s: its start-up includes the fd holder's, a
    bound for a hang only)."""
    from fscache_daemon.api import socket_answers
    os.makedirs(cache_dir, mode=0o700, exist_ok=True)
    log_path = os.path.join(cache_dir, "daemon.log")
    with open(log_path, "ab") as logf:
        p = subprocess.Popen([sys.executable, "-m", "fscache_daemon.cli", "run",
                              "--cache-dir", cache_dir, "--api-sock", api_sock,
                              "--frontend", frontend, *extra_args],
                             stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                             start_new_session=True, close_fds=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if socket_answers(api_sock):
            return p.pid
        if p.poll() is not None:
            raise DaemonError(f"daemon exited with status {p.returncode} at start; "
                              f"see {log_path}")
        time.sleep(0.05)
    raise DaemonError(f"daemon did not answer on {api_sock} within {timeout:.0f}s; "
                      f"see {log_path}")


@cli.command()
@click.argument("bootstrap", type=click.Path(exists=True, dir_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--backend", required=True,
              help="Where the data blobs are: localfs:DIR or registry:HOST/REPO[:TAG].")
@click.option("--prefetch", is_flag=True,
              help="After the image's prefetch list, fetch the rest of its blobs in the "
                   "background.")
@click.option("--domain", help="Sharing domain (cachefiles domain_id; fanotify shares "
                               "blobs by id anyway).")
@click.option("--proxy", help="HTTP proxy for registry blob reads (e.g. dfdaemon, "
                              "http://127.0.0.1:4001).")
@click.option("--mirror", help="Registry endpoint to use instead of the reference's host "
                               "(e.g. dfdaemon's registry mirror, 127.0.0.1:4001).")
@click.option("--insecure/--secure", default=None,
              help="Plain HTTP to the registry (default: only for loopback hosts).")
@sock_option
@cache_option
@click.option("--frontend", type=click.Choice(FRONTENDS), default="auto", show_default=True,
              help="Front end for a daemon started by this command.")
@click.option("--json", "as_json", is_flag=True, help="Print the mount as JSON.")
def mount(bootstrap, mountpoint, backend, prefetch, domain, proxy, mirror, insecure,
          api_sock, cache_dir, frontend, as_json):
    """Lazily mount the RAFS v6 BOOTSTRAP on MOUNTPOINT through the daemon."""
    c = _client(api_sock)
    if not c.answers():
        pid = start_daemon(api_sock, cache_dir, frontend)
        click.echo(f"started fscache-daemon (pid {pid}, log {cache_dir}/daemon.log)", err=True)
    options = {k: v for k, v in (("proxy", proxy), ("mirror", mirror),
                                 ("insecure", insecure)) if v is not None}
    if backend.startswith("localfs:"):
        backend = "localfs:" + os.path.abspath(backend[len("localfs:"):])
    res = c.call("POST", "/api/v1/mounts", {
        "bootstrap": os.path.abspath(bootstrap), "mountpoint": os.path.realpath(mountpoint),
        "backend": backend, "prefetch": prefetch, "domain": domain, "options": options})
    if as_json:
        click.echo(json.dumps(res, indent=1))
    else:
        click.echo(f"mounted {bootstrap} on {res['mountpoint']} ({len(res['blobs'])} blobs, "
                   f"backend {res['backend']})")


@cli.command()
@click.argument("mountpoint", type=click.Path(file_okay=False))
@click.option("--lazy", is_flag=True, help="Detach now, finish when no longer busy.")
@sock_option
def umount(mountpoint, lazy, api_sock):
    """Unmount an image mounted through the daemon.

    Refused (exit 1) if the mount point is busy (use --lazy) or another mount covers it.
    If the kernel still uses the image after the unmount (another mount namespace, an
    overlay, a lazy unmount with readers), the daemon keeps serving its blobs until the
    kernel lets go, and says so."""
    res = _client(api_sock).call("POST", "/api/v1/umount",
                                 {"mountpoint": os.path.realpath(mountpoint), "lazy": lazy})
    if res.get("released", True):
        click.echo(f"unmounted {res['mountpoint']}")
    else:
        click.echo(f"unmounted {res['mountpoint']}; still in use by the kernel (another "
                   f"mount namespace, an overlay or open files): its blobs stay served "
                   f"until it lets go")


@cli.command()
@click.option("--release-holder", is_flag=True,
              help="Also let the cachefiles fd holder go (only when no fscache-mode mount "
                   "is left: a restarted daemon could no longer restore them).")
@sock_option
def stop(release_holder, api_sock):
    """Stop the daemon (mounts stay; uncached reads wait until a daemon runs again)."""
    c = _client(api_sock)
    info = c.call("GET", "/api/v1/daemon")
    c.call("POST", "/api/v1/shutdown", {})
    deadline = time.monotonic() + 30
    while c.answers() and time.monotonic() < deadline:
        time.sleep(0.05)
    click.echo(f"stopped fscache-daemon (pid {info['pid']})")
    if release_holder:
        from fscache_daemon.frontend import cachefiles_holder
        sock = os.path.join(info["cache_dir"], "cachefiles-holder.sock")
        if cachefiles_holder.release(sock):
            click.echo("released the cachefiles fd holder")


@cli.command()
@click.argument("ref")
@click.option("--address", "-a", envvar="CONTAINERD_ADDRESS",
              default="/run/containerd/containerd.sock", show_default=True,
              type=click.Path(dir_okay=False), help="containerd's gRPC socket.")
@click.option("--namespace", "-n", envvar="CONTAINERD_NAMESPACE", default="default",
              show_default=True, help="containerd namespace to pull into.")
@click.option("--snapshotter", envvar="CONTAINERD_SNAPSHOTTER", default="erofs",
              show_default=True,
              help="containerd's name for fscache-daemon's snapshotter (its proxy_plugins "
                   "entry).")
@click.option("--insecure", "--plain-http", "insecure", is_flag=True, default=None,
              help="Plain HTTP to the registry (default: only for loopback hosts), for "
                   "the pull and for the snapshotter's lazy reads of this image.")
@click.option("--containerd-config", default=None, metavar="PATH",
              type=click.Path(dir_okay=False),
              help="containerd's config.toml: the registry's credentials from its CRI "
                   "plugin's registry configs (else the docker config's).")
@click.option("--mount-early/--no-mount-early", default=True, show_default=True,
              help="Have the snapshotter mount the image lazily (and start its prefetch) "
                   "as soon as its bootstrap layer is committed, not at the first "
                   "container's start.")
@click.option("--json", "as_json", is_flag=True, help="Print what was done as JSON.")
def rpull(ref, address, namespace, snapshotter, insecure, containerd_config, mount_early,
          as_json):
    """Pull image REF into containerd without downloading its Nydus blob layers.

    Like nydus's `ctr-remote image rpull`: the image record, its content and its
    snapshots are created through containerd's API, so that a stock
    `ctr run --snapshotter NAME REF ...` starts it on the daemon's lazy mount. Only the
    manifest, the config and the small bootstrap layer are downloaded (every layer of
    a plain OCI image)."""
    from fscache_daemon.rpull import rpull as do_rpull
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    res = do_rpull(ref, address, namespace, snapshotter, insecure, containerd_config,
                   mount_early=mount_early)
    if as_json:
        click.echo(json.dumps(res, indent=1))
    else:
        click.echo(f"pulled {res['image']} ({res['layers']} layers: {res['lazy_layers']} "
                   f"lazy, {res['unpacked_layers']} unpacked, {res['present_layers']} "
                   f"present) into namespace {namespace}, snapshotter {snapshotter}: "
                   f"{_human(res['bytes_fetched'])} fetched in {res['seconds']:.2f}s")


@cli.command()
@click.argument("target", type=click.Path(exists=True))
@click.option("-o", "--output", type=click.Path(dir_okay=False, allow_dash=True),
              help="Write the trace (JSON) to this file ('-': stdout).")
@click.option("--json", "as_json", is_flag=True, help="Print the trace as JSON.")
@sock_option
def trace(target, output, as_json, api_sock):
    """Export the access trace of a mounted image: which files and chunks readers needed
    first, in order, with the time after the mount (seconds). TARGET is the mount point,
    or the bootstrap file it was mounted from. Input for `erofs-tools optimize --trace`."""
    import urllib.parse
    field = "mountpoint" if os.path.isdir(target) else "bootstrap"
    query = urllib.parse.urlencode({field: os.path.realpath(target)})
    res = _client(api_sock).call("GET", f"/api/v1/trace?{query}")
    text = json.dumps(res, indent=1) + "\n"
    if output == "-" or (as_json and not output):
        click.echo(text, nl=False)
        return
    if output:
        from erofs_tools.fsutil import atomic_write_bytes
        try:
            atomic_write_bytes(output, text.encode(), stream=True)  # /dev/stdout, a FIFO
        except OSError as e:
            raise DaemonError(f"{output}: {e.strerror}") from None
    entries = res["entries"]
    click.echo(f"{len(entries)} files, {sum(len(x['chunks']) for x in entries)} chunks "
               f"first read in {res['recorded_for']:.1f}s since the mount"
               + (f"; written to {output}" if output else ""), err=bool(output))
    if not output:
        for ent in entries:
            size = sum(c["uncompressed_size"] for c in ent["chunks"])
            click.echo(f"  {ent['first_access']:9.3f}s  {ent['path']}  {len(ent['chunks'])} "
                       f"chunks, {_human(size)}")
    if res.get("complete_blobs"):
        click.echo(f"note: {len(res['complete_blobs'])} blob(s) were complete in the cache: "
                   f"their reads never reach the daemon and are not traced", err=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _no_userinfo(url: str) -> str:
    """A proxy URL as shown: without the password (or user) it may carry."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    return scheme + sep + netloc.rpartition("@")[2] + slash + path if sep else url


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Everything as one JSON document.")
@sock_option
def status(as_json, api_sock):
    """Show the daemon, its mounts and per-blob metrics."""
    c = _client(api_sock)
    info = c.call("GET", "/api/v1/daemon")
    mounts = c.call("GET", "/api/v1/mounts")
    metrics = c.call("GET", "/api/v1/metrics")
    if as_json:
        click.echo(json.dumps({"daemon": info, "mounts": mounts, "metrics": metrics},
                              indent=1))
        return
    p = metrics["process"]
    click.echo(f"fscache-daemon {info['version']} pid {info['pid']}, front end "
               f"{info['frontend']}, cache {info['cache_dir']}, up {info['uptime_s']:.0f}s, "
               f"RSS {_human(p['rss_bytes'])}, CPU {p['cpu_user_s'] + p['cpu_system_s']:.1f}s")
    for m in mounts:
        opts = m.get("options") or {}
        # where the bytes come from matters when a mirror or proxy misbehaves: say it here,
        # not only in --json
        via = "".join(f"  {k} {_no_userinfo(str(opts[k]))}" for k in ("mirror", "proxy")
                      if opts.get(k))
        if len(m.get("endpoints") or []) > 1:     # hosts.toml: mirrors, then the registry
            via += "  from " + ", ".join(m["endpoints"])
        click.echo(f"{m['mountpoint']}  {m['source_bootstrap']}  backend {m['backend']}{via}")
        for b in m["blobs"]:
            s = metrics["blobs"].get(b.get("key", b["blob_id"]), {})
            # a variant (own cache for a disagreeing chunk table) shows its table digest
            var = f"@{b['variant']}" if b.get("variant") else ""
            click.echo(f"  blob {b['blob_id'][:16]}{var}  chunks {b['cached_chunks']}/"
                       f"{b['total_chunks']}  requests {s.get('requests', 0)}  fetched "
                       f"{_human(s.get('bytes_fetched', 0))}  from cache "
                       f"{_human(s.get('bytes_served_from_cache', 0))}  verify failures "
                       f"{s.get('verify_failures', 0)}  p50 {s.get('latency_p50_ms', 0)} ms"
                       f"  p99 {s.get('latency_p99_ms', 0)} ms")
    for u in info.get("unpicked") or ():
        # the kernel has it, this daemon does not serve it yet (restore.py)
        click.echo(f"{u['mountpoint']}  NOT SERVED YET (retrying): {u['error']}")
    if not mounts and not info.get("unpicked"):
        click.echo("no mounts")
    cache = metrics.get("cache") or {}
    if cache:
        limit = "no limit" if cache["limit"] is None else f"limit {_human(cache['limit'])}"
        over = "  OVER THE LIMIT (in use)" if cache["over_limit"] else ""
        click.echo(f"cache {_human(cache['bytes'])} ({limit}), in use "
                   f"{_human(cache['in_use_bytes'])}, evicted {cache['evicted_blobs']} "
                   f"blob(s) {_human(cache['evicted_bytes'])}{over}")
    if info.get("detached"):
        click.echo(f"{info['detached']} unmounted image(s) still used by the kernel (another "
                   f"mount namespace, an overlay or open files): blobs served until released")


def main(argv=None):
    run_console(cli, "fscache-daemon", argv)

if __name__ == "__main__":
    main()
