"""A restarted daemon takes its mounts back: mounts.json reconciled with the kernel.

A mount is taken back if its mount (by id, at its canonical path) is still there, or --
recorded only as an intent -- if an EROFS mount of its bootstrap copy is on its mount
point; an unmounted one whose superblock lives on comes back detached; the rest is
forgotten.

A mount the kernel still has but the daemon cannot serve yet, for a reason that may pass
(its backend: a localfs directory moved away, a registry down or refusing for now; its
blob's storage: a chunk map not fetched), is *unpicked*: kept in mounts.json, retried
with a growing wait until it is picked up or the kernel let it go. Forgotten, it was
never served again by any later restart, although its kernel mount (and whatever reads
through it) lived on. A mount that can never be served (its bootstrap copy gone, a bad
record) is forgotten at once.

A mixin of the Daemon beside lifecycle's MountLifecycle, which it extends.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from erofs_tools.errors import RegistryError
from fscache_daemon import mounts
from fscache_daemon.errors import DaemonError, MountBusyError
from fscache_daemon.images import DETACHED, MOUNTED, MOUNTING, persisted_options
from fscache_daemon.keyedlock import KeyedLock
from fscache_daemon.state import load_state
from fscache_daemon.storage import BackendError, StorageError

if TYPE_CHECKING:
    from fscache_daemon.frontend.base import Frontend
    from fscache_daemon.images import Image

log = logging.getLogger(__name__)

# waits between two tries of an unpicked mount: the first, doubled each time, at most
RETRY_FIRST = 1.0
RETRY_MAX = 30.0
RETRY_TICK = 0.2        # how often the restorer thread looks whether one is due
# how often the front end is asked to let go of what no mount of ours uses and nothing
# else has open (release_unused: the fd holder's marks of mounts a restart forgot)
RELEASE_INTERVAL = 5.0
# what may pass (see the module's doc)
_PASSING = (BackendError, StorageError, RegistryError)


class Unpicked:
    """A mount the kernel has and the daemon could not serve yet: its mounts.json record,
    the last error, when it is tried next."""
    __slots__ = ("record", "mountpoint", "error", "wait", "next_try")

    def __init__(self, record: dict, mountpoint: str, error: str) -> None:
        self.record = dict(record, mountpoint=mountpoint)
        self.mountpoint = mountpoint
        self.error = error
        self.wait = RETRY_FIRST
        self.next_try = time.monotonic() + self.wait

    def failed_again(self, error: str) -> None:
        self.error = error
        self.wait = min(self.wait * 2, RETRY_MAX)
        self.next_try = time.monotonic() + self.wait


class MountRestore:
    # What this mixin uses of the Daemon (declared for the type checker)
    frontend: Frontend
    images: dict[str, Image]
    unpicked: list[Unpicked]
    _lock: threading.RLock
    _mountpoints: KeyedLock
    _stop: threading.Event

    if TYPE_CHECKING:
        @property
        def state_path(self) -> str: ...
        def _save_state(self) -> None: ...
        def all_images(self) -> list[Image]: ...
        def _drop_unused_bootstrap(self, boot_copy: str) -> None: ...
        def _register(self, *args: Any, **kwargs: Any) -> Image: ...

    def _restore(self) -> None:
        """Take back what mounts.json records (see the module's doc)."""
        try:
            saved, records = load_state(self.state_path)
        except DaemonError as e:
            log.error("%s; starting without mounts", e)
            saved, records = None, []
        if saved and saved != self.frontend.name and records:
            # another front end cannot serve them: their readers would wait forever
            raise DaemonError(f"{self.state_path}: {len(records)} mount(s) made with "
                              f"front end {saved}, this daemon runs {self.frontend.name}; "
                              f"restart with --frontend {saved} or unmount them first")
        kernel = self.frontend.name != "none"
        entries = mounts.mountinfo() if kernel else []
        live = mounts.erofs_instances() if kernel else set()
        forgotten = []
        for m in records:
            mp = m.get("mountpoint")
            if not isinstance(mp, str):
                continue
            mp = os.path.realpath(mp)   # older daemons recorded paths as given
            state, mount_id = self._reconcile(m, mp, entries, live, kernel)
            if state is None:
                log.info("%s is no longer mounted; forgetting it", mp)
                forgotten.append(m.get("bootstrap", ""))
                continue
            error = self._pick_up(m, mp, state, mount_id)
            if error is None:
                log.info("picked up %s mount %s", state, mp)
            elif self._may_pass(m, error):
                log.error("cannot pick up mount %s yet: %s (tried again until it can be "
                          "or it is unmounted)", mp, error)
                with self._lock:
                    self.unpicked.append(Unpicked(m, mp, str(error)))
            else:
                log.error("cannot pick up mount %s: %s", mp, error)
        for boot in forgotten:      # after the loop: a later record may share the copy
            self._drop_unused_bootstrap(boot)
        self._save_state()
        self._release_unused()

    def _release_unused(self) -> None:
        """What the front end holds for no mount of ours (the fd holder's marks of the
        mounts forgotten here, or by an earlier restart) goes once nothing uses it; what
        a live superblock still reads stays (Frontend.release_unused)."""
        try:
            self.frontend.release_unused()
        except Exception as e:  # noqa: BLE001 - kept until the next try: never worse
            log.warning("cannot release what no mount uses: %s", e)

    def _pick_up(self, m: dict, mp: str, state: str, mount_id) -> Exception | None:
        """Register recorded mount `m` as found in the kernel: None, or why not."""
        if m.get("proxy_credentials_dropped"):
            log.warning("%s: its proxy's credentials were not kept across the restart "
                        "(images.persisted_options); its reads use the proxy without "
                        "them, or go direct if it refuses: mount it again to give them",
                        mp)
        try:
            self._register(m["bootstrap"], mp, m["backend"], m.get("prefetch", False),
                           m.get("domain"), m.get("options"), m.get("source_bootstrap"),
                           mounted_at=m.get("mounted_at"), state=state,
                           mount_id=mount_id, instances=m.get("instances") or (),
                           blob_keys=m.get("blob_keys"))
        except (DaemonError, RegistryError, KeyError, OSError) as e:
            return e
        return None

    @staticmethod
    def _may_pass(m: dict, error: Exception) -> bool:
        boot = m.get("bootstrap")
        return isinstance(error, _PASSING) and isinstance(boot, str) and \
            os.path.isfile(boot)

    def _reconcile(self, m: dict, mp: str, entries, live: set[str], kernel: bool):
        """(state, mount id) a recorded mount has now, or (None, None) if it is gone."""
        state = m.get("state", MOUNTED)
        if not kernel:
            return (None, None) if state == MOUNTING else (MOUNTED, None)
        erofs_here = [e for e in entries if e.mountpoint == mp and e.fstype == "erofs"]
        if self.frontend.name == "fanotify":   # file-backed: the source is our copy
            boot = os.path.realpath(str(m.get("bootstrap")))
            erofs_here = [e for e in erofs_here if os.path.realpath(e.source) == boot]
        mount_id = m.get("mount_id")
        if state == MOUNTING or (state == MOUNTED and mount_id is None):
            if erofs_here:
                top = mounts.top_mount(mp, erofs_here) or erofs_here[-1]
                self._name_superblock(m, mp, entries, top.mount_id)
                return MOUNTED, top.mount_id
        elif state == MOUNTED:
            if any(e.mount_id == mount_id for e in erofs_here):
                return MOUNTED, mount_id
        insts = m.get("instances") or []
        if state != MOUNTING and insts and any(i in live for i in insts):
            return DETACHED, None
        return None, None

    @staticmethod
    def _name_superblock(m: dict, mp: str, entries, mount_id: int) -> None:
        """A record of an intent (killed between mount(2) and the save) names no
        superblock: ask the kernel for the one of the mount found, if it is the one a
        lookup of mp reaches (else unknown, as before: umount diffs)."""
        if m.get("instances"):
            return
        top = mounts.top_mount(mp, entries)
        if top is not None and top.mount_id == mount_id:
            ours = mounts.erofs_instance_of(mp)
            if ours:
                m["instances"] = [ours]

    def unpicked_records(self) -> list[dict]:
        """The mounts.json records of the unpicked mounts (saved with the images)."""
        with self._lock:
            # one taken back a moment ago is saved as its image (not twice: a second
            # record of one mount point would be taken back twice by the next restart)
            taken = {(i.mountpoint, i.bootstrap) for i in self.all_images()}
            # (a record of an older daemon's file may hold a proxy's password: it is
            # tried with it, never written back)
            return [_persisted(u.record) for u in self.unpicked
                    if (u.mountpoint, u.record.get("bootstrap")) not in taken]

    def uses_bootstrap_unpicked(self, boot_copy: str) -> bool:
        with self._lock:
            return any(u.record.get("bootstrap") == boot_copy for u in self.unpicked)

    def _restorer(self) -> None:
        """The unpicked mounts' tries, on a thread of their own: one may wait for a slow
        registry, which must not hold up the reaper's release of detached images; and,
        every RELEASE_INTERVAL, what no mount of ours uses (_release_unused)."""
        next_release = time.monotonic() + RELEASE_INTERVAL
        while not self._stop.wait(RETRY_TICK):
            if time.monotonic() >= next_release:
                next_release = time.monotonic() + RELEASE_INTERVAL
                self._release_unused()
            if not self.unpicked:
                continue
            try:
                self.retry_unpicked()
            except Exception:  # noqa: BLE001 - the next tick tries again
                log.exception("retrying unpicked mounts")

    def retry_unpicked(self) -> None:
        """Try the unpicked mounts whose wait is over (the reaper thread's turn)."""
        now = time.monotonic()
        with self._lock:
            due = [u for u in self.unpicked if u.next_try <= now]
        if not due:
            return
        kernel = self.frontend.name != "none"
        entries = mounts.mountinfo() if kernel else []
        live = mounts.erofs_instances() if kernel else set()
        for u in due:
            mp = u.mountpoint
            with self._mountpoints.hold(mp):    # no mount or umount of mp meanwhile
                state, mount_id = self._reconcile(u.record, mp, entries, live, kernel)
                if state == MOUNTED and mp in self.images:
                    # mounted over since: ours lives on under it, not at the mount point
                    state, mount_id = DETACHED, None
                error = None if state is None else \
                    self._pick_up(u.record, mp, state, mount_id)
                if error is not None and self._may_pass(u.record, error):
                    u.failed_again(str(error))
                    log.warning("still cannot pick up mount %s: %s (next try in %.0f s)",
                                mp, error, u.wait)
                    continue
                with self._lock:
                    self.unpicked.remove(u)
                if state is None:
                    log.info("%s is no longer mounted; forgetting it", mp)
                elif error is None:
                    log.info("picked up %s mount %s", state, mp)
                else:
                    log.error("cannot pick up mount %s: %s", mp, error)
                if state is None:
                    self._drop_unused_bootstrap(u.record.get("bootstrap", ""))
                self._save_state()

    def umount_unpicked(self, mountpoint: str, lazy: bool) -> dict | None:
        """`umount` of an unpicked mount (the caller holds the mount point): its kernel
        mount, if still ours and on top, is unmounted and its record dropped, or kept as
        detached while its superblock lives on (another holder: served once it can be).
        None if `mountpoint` is not an unpicked one."""
        with self._lock:
            u = next((u for u in self.unpicked if u.mountpoint == mountpoint), None)
        if u is None:
            return None
        rec = u.record
        kernel = self.frontend.name != "none"
        if kernel and isinstance(rec.get("mount_id"), int):
            entries = mounts.mountinfo()
            ours = mounts.find_mount(rec["mount_id"], entries)
            if ours is not None and ours.mountpoint == mountpoint and ours.fstype == "erofs":
                top = mounts.top_mount(mountpoint, entries)
                if top is not None and top.mount_id != ours.mount_id:
                    raise MountBusyError(f"{mountpoint}: another mount ({top.fstype} "
                                         f"{top.source}, mount id {top.mount_id}) covers "
                                         "the image; unmount it first")
                mounts.umount(mountpoint, lazy)
        insts = rec.get("instances") or []
        alive = kernel and any(i in mounts.erofs_instances() for i in insts)
        with self._lock:
            if alive:
                rec.update(state=DETACHED, mount_id=None)
            else:
                self.unpicked.remove(u)
        if not alive:
            self._drop_unused_bootstrap(rec.get("bootstrap", ""))
        self._save_state()
        log.info("unmounted %s (never taken back since the restart)", mountpoint)
        return {"mountpoint": mountpoint, "unmounted": True, "released": not alive}


def _persisted(record: dict) -> dict:
    """An unpicked mount's record as saved: a record of an older daemon's file may hold
    a proxy's password, tried with it here, never written back."""
    options = record.get("options")
    if not isinstance(options, dict) or persisted_options(options) is options:
        return record
    return {**record, "options": persisted_options(options),
            "proxy_credentials_dropped": True}
