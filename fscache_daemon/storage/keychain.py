"""Pull secrets kubelet sent with CRI PullImage, kept for the daemon's blob reads.

containerd passes a pull secret to nobody: a snapshotter that reads an image's blobs
lazily never sees the credentials kubelet gave for it. The daemon's CRI image-service
proxy (snapshotter/image_proxy.py) sits between kubelet and containerd, records the
`auth` of each PullImageRequest here under the image's registry host and repository,
and forwards the request unchanged. A registry backend then asks `credentials(host,
repository)` for each endpoint it contacts: only the image's own registry host gets
them (a mirror or another registry never does; session.py keeps them off redirects),
and only for that repository.

The entries are written to `keychain.json` in the cache directory (mode 0600, replaced
atomically), so a restarted daemon still reads the blobs of the images it serves;
at most MAX_ENTRIES, the least recently recorded dropped first.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict

from erofs_tools.errors import ErofsToolsError
from erofs_tools.fsutil import atomic_write_bytes
from erofs_tools.registry.auth import Credentials

log = logging.getLogger(__name__)

MAX_ENTRIES = 1024
MAX_FILE = 4 << 20
FILE_NAME = "keychain.json"


class Keychain:
    """(registry host, repository) -> Credentials, persisted in `directory`."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, FILE_NAME)
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], Credentials] = OrderedDict()
        self._load()

    def credentials(self, host: str, repository: str) -> Credentials | None:
        with self._lock:
            return self._entries.get((host.lower(), repository))

    def put(self, host: str, repository: str, creds: Credentials | None) -> None:
        """Record (or with None forget) the credentials of one image's pull."""
        key = (host.lower(), repository)
        with self._lock:
            if creds is None:
                if self._entries.pop(key, None) is None:
                    return
            else:
                if self._entries.get(key) == creds:
                    self._entries.move_to_end(key)
                    return
                self._entries[key] = creds
                self._entries.move_to_end(key)
                while len(self._entries) > MAX_ENTRIES:
                    self._entries.popitem(last=False)
            self._save()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _save(self) -> None:
        rows = [{"host": h, "repository": r, "username": c.username,
                 "password": c.password, "identity_token": c.identity_token}
                for (h, r), c in self._entries.items()]
        try:
            atomic_write_bytes(self.path, json.dumps({"version": 1, "entries": rows}).encode(),
                               mode=0o600)
        except (OSError, ErofsToolsError) as e:
            # the pull goes on; only a restarted daemon would miss these credentials
            log.warning("%s: cannot write the pull secrets: %s", self.path, e)

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_FILE + 1)
        except FileNotFoundError:
            return
        except OSError as e:
            log.warning("%s: cannot read the pull secrets: %s", self.path, e.strerror)
            return
        try:
            if len(data) > MAX_FILE:
                raise ValueError("too large")
            doc = json.loads(data)
            rows = doc["entries"] if doc.get("version") == 1 else None
            if not isinstance(rows, list):
                raise ValueError("unknown version")
            for row in rows[-MAX_ENTRIES:]:
                fields = [row["host"], row["repository"], row["username"], row["password"]]
                token = row.get("identity_token")
                if not all(isinstance(x, str) for x in fields) or \
                        not isinstance(token, (str, type(None))):
                    raise ValueError("bad entry")
                self._entries[(fields[0].lower(), fields[1])] = \
                    Credentials(fields[2], fields[3], token)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            # never the content: it holds secrets
            log.warning("%s: ignored, not a pull-secret file of this daemon (%s)", self.path,
                        type(e).__name__ if not isinstance(e, ValueError) else e)
            self._entries.clear()
