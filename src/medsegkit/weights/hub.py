"""Download once, verify the hash, cache under ``$MEDSEGKIT_HOME`` (default ``~/.cache/medsegkit``)."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

from medsegkit.errors import CheckpointError
from medsegkit.files import atomic_write

__all__ = ["cache_dir", "download", "hash_prefix_from_filename", "sha256_of"]

_TV_HASH = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9.]+$")


def cache_dir() -> Path:
    """``$MEDSEGKIT_HOME/checkpoints`` (``~/.cache/medsegkit/checkpoints`` by default)."""
    home = os.environ.get("MEDSEGKIT_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "medsegkit")
    return Path(home) / "checkpoints"


def sha256_of(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def hash_prefix_from_filename(url: str) -> str | None:
    """torchvision's convention: ``resnet50-0676ba61.pth`` carries the first 8 hex digits of the sha256."""
    name = Path(urllib.parse.urlparse(url).path).name
    match = _TV_HASH.search(name)
    return match.group(1) if match else None


def download(url: str, *, sha256: str | None = None, progress: bool = True, timeout: float = 60.0) -> Path:
    """Return a local path of ``url``'s file, downloading it into the cache on first use.

    Args:
        url: ``http(s)://`` or ``file://`` address.
        sha256: the full digest or a prefix of it; ``None`` uses the prefix in the file name when there
            is one (torchvision style). A cached file is re-checked against it. Without any hash, a file is
            cached under the URL it came from (``checkpoints/url-<hash of the URL>/NAME``), and a ``file://``
            address is read where it is (not copied).
        progress: show a tqdm bar while downloading.

    Raises:
        CheckpointError: the file's hash differs from ``sha256`` (the partial file is deleted).
        OSError: the address cannot be reached.
    """
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme not in ("http", "https", "file"):
        raise ValueError(f"unsupported URL scheme {parsed.scheme!r} in {url!r}; use http(s):// or file://")
    expected = (sha256 or hash_prefix_from_filename(url) or "").lower() or None
    name = parsed.path.rsplit("/", 1)[-1]
    if not name:
        raise ValueError(f"{url!r} names no file (its path ends with '/'); give the checkpoint file's URL")
    if expected is None and parsed.scheme == "file":  # nothing to check a copy against: read the file where it is
        return Path(urllib.request.url2pathname(parsed.path))
    # a file checked by its hash is found by its name; without a hash, only a copy of this very URL is reused
    # (two URLs ending in the same name are different files)
    target = cache_dir() / (name if expected is not None else Path(_url_key(url)) / name)
    if target.exists():
        if expected is None or sha256_of(target).startswith(expected):
            return target
        target.unlink()  # stale or corrupt cache entry: fetch again

    def write(tmp: Path) -> None:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            bar = None
            if progress:
                from tqdm.auto import tqdm

                bar = tqdm(total=total, unit="B", unit_scale=True, desc=target.name, leave=False)
            try:
                while block := response.read(1 << 20):
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
            finally:
                if bar is not None:
                    bar.close()
        if expected is not None:
            actual = sha256_of(tmp)
            if not actual.startswith(expected):
                raise CheckpointError(
                    f"downloaded {url} has sha256 {actual}, expected {expected}…; the file was discarded"
                )

    atomic_write(target, write)
    return target


def _url_key(url: str) -> str:
    """The cache folder of the files downloaded from ``url`` without a hash: ``url-`` + 16 hex digits of its sha256."""
    return "url-" + hashlib.sha256(url.encode()).hexdigest()[:16]


def copy_into_cache(path: str | os.PathLike) -> Path:
    """Place a local file into the cache (used by tests and offline installs)."""
    target = cache_dir() / Path(path).name
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(target, lambda tmp: shutil.copyfile(path, tmp))
    return target
