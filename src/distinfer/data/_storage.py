"""Where inputs and outputs live: a local path, or an fsspec URL every worker can reach.

A string holding `://` is a URL, opened with `fsspec.core.url_to_fs` (imported only then);
`file://` URLs are plain local paths. Local paths keep the fast system calls (os.stat, seek and
read, write to a temporary name then os.replace). Object stores have no rename, but one PUT is
atomic (an object appears whole or not at all), so remote files are written in one
`pipe_file` under their final name.
"""

from __future__ import annotations

import datetime
import io
import os
import stat
import uuid
from collections.abc import Callable
from typing import Any, BinaryIO, NamedTuple

from distinfer.errors import DistinferError, InputError

__all__ = ["Location", "Stat", "is_url", "join_location", "locate", "normalize_location", "reason"]

Writer = Callable[[Any], None]  # called with a local path or a binary file object
_FILE = "file://"
# the package that provides a protocol, for the message when fsspec itself is missing
_PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
             "abfs": "adlfs", "abfss": "adlfs", "hf": "huggingface_hub", "http": "aiohttp",
             "https": "aiohttp", "sftp": "paramiko", "ssh": "paramiko"}
# what identifies an object's version, most specific first; the first one present is used
_VERSION_KEYS = ("ETag", "etag", "generation", "VersionId", "version_id", "md5Hash", "checksum")
_TIME_KEYS = ("mtime", "LastModified", "last_modified", "updated", "modified", "created")


class Stat(NamedTuple):
    size: int
    mtime_ns: int  # 0 where the store does not say
    version: str  # "" for local files; an ETag, generation, ... for objects
    is_dir: bool


def is_url(location: str) -> bool:
    return "://" in location


def normalize_location(location: str) -> str:
    """An absolute local path for a path or a `file://` URL; any other URL unchanged."""
    if location.startswith(_FILE):
        return os.path.abspath(location[len(_FILE):])
    return location if is_url(location) else os.path.abspath(location)


def join_location(base: str, name: str) -> str:
    """`name` inside the directory `base` (a local path or a URL)."""
    if is_url(base) and not base.startswith(_FILE):
        return f"{base.rstrip('/')}/{name}"
    return os.path.join(base.removeprefix(_FILE), name)


def _protocol(url: str) -> str:
    return url.split("::")[-1].split("://")[0]


def _filesystem(url: str, error: type[DistinferError]) -> tuple[Any, str]:
    verb = "reading" if issubclass(error, InputError) else "writing"
    protocol = _protocol(url)
    try:
        import fsspec.core
        from fsspec.registry import known_implementations
    except ImportError:
        package = f"fsspec {_PACKAGES[protocol]}" if protocol in _PACKAGES else "fsspec"
        raise error(f"{verb} '{url}' needs fsspec and the filesystem package for '{protocol}' "
                    f"(e.g. pip install {package})") from None
    try:
        return fsspec.core.url_to_fs(url)  # type: ignore[no-any-return]
    except ImportError:
        known = known_implementations.get(protocol, {})
        package = str(known.get("class", protocol)).split(".")[0]
        raise error(f"{verb} '{url}' needs the filesystem package for '{protocol}' "
                    f"(e.g. pip install {package})") from None
    except ValueError as exc:
        if "Protocol not known" not in str(exc):
            raise error(f"{verb} '{url}' failed: {_first_line(exc)}") from None
        raise error(f"'{url}' uses the storage protocol '{protocol}', which fsspec does not "
                    "know; use a local path or a URL such as s3://bucket/key") from None
    except Exception as exc:  # credentials, malformed URL: whatever the filesystem raises
        raise error(f"{verb} '{url}' failed: {_first_line(exc)}") from None


def reason(exc: OSError) -> str:
    """An OSError's cause in a few words, for a one-line message."""
    return str(exc.strerror or exc).strip().split("\n")[0] or type(exc).__name__


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def locate(location: str, error: type[DistinferError] = InputError) -> Location:
    """The local file or remote object at `location`; `error` is raised if it cannot be reached."""
    if location.startswith(_FILE):
        return Location(location.removeprefix(_FILE))
    if is_url(location):
        fs, path = _filesystem(location, error)
        return _Remote(location, fs, path)
    return Location(location)


class Location:
    """A local file or directory; `_Remote` does the same over an fsspec filesystem.

    Methods raise OSError (FileNotFoundError where nothing is there); callers turn it into
    a one-line InputError or OutputError naming `location`.
    """

    local = True

    def __init__(self, location: str) -> None:
        self.location = location

    def __str__(self) -> str:
        return self.location

    def child(self, name: str) -> Location:
        return Location(os.path.join(self.location, name))

    def stat(self) -> Stat:
        info = os.stat(self.location)
        return Stat(info.st_size, info.st_mtime_ns, "", stat.S_ISDIR(info.st_mode))

    def open(self, random_access: bool = False) -> BinaryIO:
        return open(self.location, "rb")

    def read(self, start: int = 0, stop: int | None = None) -> bytes:
        with open(self.location, "rb") as f:
            f.seek(start)
            return f.read(-1 if stop is None else stop - start)

    def listdir(self) -> list[str]:
        return os.listdir(self.location)

    def is_file(self) -> bool:
        return os.path.exists(self.location) and not os.path.isdir(self.location)

    def makedirs(self) -> None:
        os.makedirs(self.location, exist_ok=True)

    def writable(self) -> bool:
        return os.access(self.location, os.W_OK | os.X_OK)

    def remove(self) -> None:
        os.remove(self.location)

    def write(self, data: bytes | Writer) -> None:
        """Replace the file atomically; `data` is the bytes, or a writer given a path."""
        head, tail = os.path.split(self.location)
        temp = os.path.join(head, f".{tail}.{uuid.uuid4().hex}.tmp")
        try:
            if isinstance(data, bytes):
                with open(temp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())  # a power cut must not leave an empty file behind
            else:
                data(temp)
            os.replace(temp, self.location)
        except BaseException:
            try:
                os.remove(temp)
            except OSError:
                pass  # never written, or the directory is gone: nothing to clean up
            raise


class _Remote(Location):
    local = False

    def __init__(self, location: str, fs: Any, path: str) -> None:
        super().__init__(location)
        self.fs, self.path = fs, path

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """`fs.method(path, ...)`; a client library's own errors become one-line OSErrors."""
        try:
            return getattr(self.fs, method)(self.path, *args, **kwargs)
        except OSError:
            raise
        except Exception as exc:  # botocore, google.api_core, ...: callers report OSErrors
            raise OSError(_first_line(exc)) from exc

    def child(self, name: str) -> Location:
        return _Remote(join_location(self.location, name), self.fs,
                       f"{self.path.rstrip('/')}/{name}")

    def stat(self) -> Stat:
        info = self._call("info")
        version = next((f"{k}={info[k]}" for k in _VERSION_KEYS if info.get(k)), "")
        mtime = next((_nanoseconds(info[k]) for k in _TIME_KEYS if info.get(k)), 0)
        return Stat(int(info.get("size") or 0), mtime, version, info.get("type") == "directory")

    def open(self, random_access: bool = False) -> BinaryIO:
        if random_access:  # Parquet reads whole column chunks: read ahead nothing beyond them
            try:
                return self.fs.open(self.path, "rb", cache_type="none")  # type: ignore[no-any-return]
            except Exception:
                pass  # no fsspec caches here (TypeError), or a real error: the next call tells
        return self._call("open", "rb")  # type: ignore[no-any-return]

    def read(self, start: int = 0, stop: int | None = None) -> bytes:
        if stop is not None and stop <= start:
            return b""
        return bytes(self._call("cat_file", start, stop))

    def listdir(self) -> list[str]:
        self.fs.invalidate_cache(self.path)  # other processes wrote here since we last looked
        try:
            paths = self._call("ls", detail=False)
        except FileNotFoundError:
            return []
        own = self.path.rstrip("/")
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in paths if p.rstrip("/") != own]

    def is_file(self) -> bool:
        return bool(self.fs.isfile(self.path))

    def makedirs(self) -> None:
        self._call("makedirs", exist_ok=True)  # a no-op on object stores

    def writable(self) -> bool:
        return True  # no cheap check: a failed write names the location

    def remove(self) -> None:
        self._call("rm")

    def write(self, data: bytes | Writer) -> None:
        if not isinstance(data, bytes):
            buffer = io.BytesIO()
            data(buffer)
            data = buffer.getvalue()
        self._call("pipe_file", data)


def _nanoseconds(value: Any) -> int:
    if isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return 0
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:  # every node must read the same instant, whatever its zone
            value = value.replace(tzinfo=datetime.timezone.utc)
        return int(value.timestamp() * 1e9)
    if isinstance(value, (int, float)):
        return int(value * 1e9)
    return 0
