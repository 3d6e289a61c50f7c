"""Shards at fsspec URLs (``s3://``, ``gs://``, ``https://``, ``file://``, ``memory://``...).

Nothing is copied locally: the index is built by reading the tar once front to back in large
chunks (``open_shard``), and the PyTorch loader then fetches each sample's members as byte ranges
(``read_range``; one ranged request per member). Every request is retried a bounded number of times
with exponential backoff (``configure``, ``data.retries``); a missing object (404) or refused access
(401/403) is not retried and stops with one line naming the URL. While training, a read whose retries
are spent is an outage, not damage: the loader keeps trying for up to ``data.outage_deadline_s``
(``through_outage``), then the trainer checkpoints and stops; no sample is skipped for it. Access refused
while training (expired credentials) is not damage either: the trainer checkpoints and stops at once. The backends for s3:// (s3fs),
gs:// (gcsfs) and http(s):// (aiohttp) are optional packages, imported on first use with a message
naming the extra that installs them. The DALI loader reads local files only, so remote shards are
read by the PyTorch loader (``loader.py`` says so when it picks it).
"""
from __future__ import annotations

import io
import logging
import re
import time

log = logging.getLogger("fasttips.data")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
BACKENDS = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "http": "aiohttp", "https": "aiohttp"}
CHUNK = 4 << 20                 # bytes per request when reading a shard front to back (indexing)
_settings = {"retries": 3, "backoff_s": 0.5}
MAX_OUTAGE_PAUSE_S = 30.0       # the longest pause between two tries while waiting out an outage
# errors of the network stacks behind fsspec that are worth another try (besides OSError/TimeoutError)
_TRANSIENT_MODULES = ("aiohttp", "botocore", "aiobotocore", "google", "gcsfs", "s3fs", "requests", "urllib3")


class RemoteError(OSError):
    """A remote read that failed for good (retries spent, or 404 / refused access). Indexing lets it
    through rather than counting the shard as damaged, so a network outage is never cached as a
    property of the shard."""


class RemoteUnavailable(RemoteError):
    """The store kept failing with transient errors (a 503, a refused connection, a timeout) until the
    retries were spent: an outage, not damage."""


class DataStop(RemoteError):
    """Training cannot read a sample for a reason that is the storage's, not the sample's: the trainer
    checkpoints the state from before the step and stops; no sample is skipped. ``kind`` says which."""
    kind = "stop"


class RemoteOutage(RemoteUnavailable, DataStop):
    """An outage that outlasted ``data.outage_deadline_s`` while training read a sample
    (``through_outage``)."""
    kind = "outage"


class AccessLost(DataStop, PermissionError):
    """The store refused access (401/403) while training read a sample of an indexed shard, e.g. because
    the credentials expired: waiting does not help, so the run checkpoints and stops at once."""
    kind = "denied"


class RemoteNotFound(RemoteError, FileNotFoundError):
    pass


class RemoteDenied(RemoteError, PermissionError):
    pass


def is_url(path) -> bool:
    """True for ``scheme://...`` (a remote or fsspec location); plain paths are local files."""
    return bool(_SCHEME.match(str(path)))


def local_path(url: str) -> str:
    """``file:///a/b`` -> ``/a/b`` (local files keep the fast path and the DALI loader)."""
    return url[len("file://"):] if url.lower().startswith("file://") else url


def configure(retries: int | None = None, backoff_s: float | None = None) -> None:
    """Process-wide retry policy (``data.retries``); DataLoader workers inherit it by fork."""
    if retries is not None:
        _settings["retries"] = max(0, int(retries))
    if backoff_s is not None:
        _settings["backoff_s"] = float(backoff_s)


def filesystem(url: str):
    """(fsspec filesystem, path within it) of a URL, with a clear message for a missing backend."""
    import fsspec
    protocol = _SCHEME.match(url).group(1).lower()
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as exc:
        pkg = BACKENDS.get(protocol, str(exc.name or "a backend package"))
        raise ImportError(f"{url}: reading {protocol}:// needs the optional package {pkg} "
                          f"(pip install 'fasttips[remote]' or pip install {pkg})") from None
    except ValueError as exc:                     # fsspec: "Protocol not known"
        raise ValueError(f"{url}: unknown storage protocol {protocol}:// ({exc})") from None


def _status(exc) -> int | None:
    for attr in ("status", "status_code", "code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    return None


def _classify(exc: BaseException) -> str:
    """'missing', 'denied', 'transient' or 'other' (a bug: raised as it is)."""
    cause = exc.__cause__
    if isinstance(exc, FileNotFoundError) and cause is not None and cause is not exc:
        # fsspec's http info() turns *any* failure (a 503, a refused connection) into
        # FileNotFoundError from the real error: judge by that one
        kind = _classify(cause)
        return kind if kind != "other" else "missing"
    status = _status(exc)
    if isinstance(exc, FileNotFoundError) or status in (404, 410):
        return "missing"
    if isinstance(exc, PermissionError) or status in (401, 403):
        return "denied"
    if isinstance(exc, (OSError, TimeoutError, EOFError)) or status is not None:
        return "transient"
    if type(exc).__module__.split(".")[0] in _TRANSIENT_MODULES:
        return "transient"
    return "other"


def _short(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.__cause__ is not None:
        exc = exc.__cause__                       # the real error behind fsspec's http FileNotFoundError
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def retrying(url: str, what: str, fn):
    """``fn()`` with bounded retries and backoff; one-line errors naming ``url``."""
    retries, backoff = _settings["retries"], _settings["backoff_s"]
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as exc:  # classified below; unknown kinds are re-raised untouched
            kind = _classify(exc)
            if kind == "missing":
                raise RemoteNotFound(f"{url}: not found (404 / no such object) while {what}") from None
            if kind == "denied":
                raise RemoteDenied(f"{url}: access denied while {what} ({_short(exc)}); check the "
                                      "credentials of this storage (e.g. AWS_PROFILE, "
                                      "GOOGLE_APPLICATION_CREDENTIALS)") from None
            if kind == "other":
                raise
            if attempt == retries:
                raise RemoteUnavailable(f"{url}: {what} failed after {retries + 1} tries: {_short(exc)}") from None
            delay = backoff * (2 ** attempt)
            log.warning("%s: %s failed (%s); retry %d of %d in %.1f s", url, what, _short(exc),
                        attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def through_outage(url: str, fn, deadline_s: float):
    """``fn()`` (a read with its own retries, ``retrying``), tried again with growing pauses (up to
    ``MAX_OUTAGE_PAUSE_S``) while the store is unavailable, for up to ``deadline_s`` seconds from the
    start of the first failed read (its own retries included); then ``RemoteOutage``. A training run waits
    an outage out rather than skipping the samples it cannot read (``data.outage_deadline_s``). Refused
    access is not waited for: it becomes ``AccessLost`` (the run stops, nothing skipped); a 404 (the
    object was deleted since it was indexed) goes through as it is."""
    first_failure, pause = None, _settings["backoff_s"]
    while True:
        tried = time.monotonic()
        try:
            return fn()
        except RemoteDenied as exc:
            raise AccessLost(str(exc)) from None
        except RemoteUnavailable as exc:
            now = time.monotonic()
            first_failure = tried if first_failure is None else first_failure   # (its retries count too)
            left = deadline_s - (now - first_failure)
            if left <= 0:
                raise RemoteOutage(f"the storage did not answer for {now - first_failure:.1f} s "
                                   f"(data.outage_deadline_s={deadline_s:g}); last error: {exc}") from None
            pause = min(2 * pause, MAX_OUTAGE_PAUSE_S, left)
            log.warning("%s: unavailable (%s); trying again in %.1f s, for up to %.1f s more "
                        "(data.outage_deadline_s)", url, exc, pause, left)
            time.sleep(pause)


def info(url: str) -> dict:
    fs, path = filesystem(url)
    return retrying(url, "reading its size", lambda: fs.info(path))


def fingerprint(url: str) -> list:
    """[size, version tag]: the ETag / checksum / modification time the store reports (whichever it
    has), so a rewritten object gets a new index. A store that reports none gives [size, ""]."""
    d = info(url)
    tag = ""
    for key in ("ETag", "etag", "md5Hash", "crc32c", "generation", "LastModified", "Last-Modified",
                "updated", "mtime", "created"):
        if d.get(key) not in (None, ""):
            tag = f"{key}={d[key]}"
            break
    return [int(d.get("size") or 0), tag]


def list_remote(url: str) -> list[str]:
    """The ``.tar`` URLs at ``url``: the object itself, a glob (``s3://b/x/*.tar``) or a folder."""
    fs, path = filesystem(url)
    if any(ch in path for ch in "*?["):
        found = retrying(url, "listing", lambda: fs.glob(path))
    elif path.endswith(".tar") and info(url).get("type") != "directory":
        return [url]                              # (info: a missing object stops here, naming the URL)
    else:                                         # a folder (over http: the links of its index page)
        found = retrying(url, "listing", lambda: fs.find(path.rstrip("/") + "/"))
    return sorted({fs.unstrip_protocol(p) if not is_url(p) else p for p in found if str(p).endswith(".tar")})


def read_range(url: str, offset: int, size: int) -> bytes:
    """Bytes [offset, offset + size) of the object, retried; a short answer is an error."""
    fs, path = filesystem(url)

    def fetch():
        data = fs.cat_file(path, start=offset, end=offset + size)
        if len(data) > size and offset + size <= len(data):
            data = data[offset:offset + size]         # a server that ignores Range sends the whole object
        if len(data) != size:
            raise EOFError(f"short read at offset {offset} ({len(data)} of {size} bytes)")
        return data
    return retrying(url, f"reading bytes {offset}..{offset + size}", fetch)


class _RangeFile(io.RawIOBase):
    """A seekable read-only file over ``read_range`` (each read is one retried request)."""

    def __init__(self, url: str, size: int):
        self.url, self.size, self.pos = url, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = max(0, offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset)
        return self.pos

    def readinto(self, buf) -> int:
        n = min(len(buf), self.size - self.pos)
        if n <= 0:
            return 0
        data = read_range(self.url, self.pos, n)
        buf[:n] = data
        self.pos += n
        return n


def open_shard(url: str, size: int | None = None):
    """A buffered, seekable binary file of a remote shard, read in ``CHUNK`` requests: reading it
    front to back (tarfile while indexing) streams the object once."""
    if size is None:
        size = int(info(url).get("size") or 0)
    return io.BufferedReader(_RangeFile(url, size), buffer_size=CHUNK)
