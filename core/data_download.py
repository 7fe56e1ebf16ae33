"""``gem data``: download, verify and list the data sets the recipes read.

Every data set is a :class:`DataSource`: the files its publisher serves (:class:`RemoteFile`,
with the size and checksums recorded by a published loader), the folder its recipe reads, and
its terms. :data:`SOURCES` holds the real ones; tests build their own table for files they serve
from a loopback server.

A download lands in ``<target>.part`` next to its target and resumes from there (HTTP range);
nothing is renamed to the target until its size and checksums are right, and an archive is
unpacked into a temporary folder that is renamed into place when complete, so a loader never
sees a half-written file. A file whose checksum is wrong is kept aside as ``<name>.bad-<sha8>``.
What was verified is recorded in ``<root>/.gem-data.json``; ``gem data list`` reads that record,
``gem data verify`` checks the files again.

``GEM_DATA_MIRROR`` (or ``--mirror``) replaces every official URL with
``<mirror>/<data set>/<file name>``: a mirror of your institute, or a local server in tests.
``--mirror hf:OWNER/REPO`` fetches the files from a Hugging Face dataset repository through
``huggingface_hub``. The checksums are checked whatever the source.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import html
import json
import os
import re
import shlex
import shutil
import socket
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Optional, Sequence

from gem.cli_errors import guard
from gem.errors import GemError, MissingDependencyError
from gem.io import write_json
from gem.progress import add_verbosity_options, logger, progress, setup_from_args

__all__ = ["DataSource", "RemoteFile", "SOURCES", "MIRROR_ENV", "DownloadError", "ChecksumError",
           "download", "verify", "status", "download_command", "data_main"]

#: Environment variable naming a base URL that serves ``<data set>/<file name>``.
MIRROR_ENV = "GEM_DATA_MIRROR"

#: What records the verified files in a data set's folder.
RECORD_FILE = ".gem-data.json"

#: Seconds to wait before each retry of a transient failure (a dropped connection, a 5xx).
RETRY_DELAYS: tuple[float, ...] = (1.0, 3.0, 10.0)

#: Seconds a connection may stay silent before it counts as dropped.
TIMEOUT = 60.0

_CHUNK = 1 << 20
_DRIVE_URL = "https://drive.google.com/uc?export=download&id={id}"


@dataclass(frozen=True)
class RemoteFile:
    """One file a publisher serves.

    Attributes
    ----------
    name : the published file name (what lands in the folder, or the archive that is unpacked).
    url : the official address (ignored when ``drive_id`` is set).
    size : bytes, when a published loader records it (None: not checked).
    sha256, md5 : hex digests recorded by a published loader (None: not checked).
    drive_id : a Google Drive file id; the download goes through Drive's confirm page.
    unpack_to : for a zip archive, the folder (relative to the root) its images go to; the
        archive is removed once unpacked.
    contains : a file that marks the folder to take out of the archive (``000001.jpg``, ``data.mdb``).
    n_files : how many files that folder holds, when published (checked by ``gem data verify``).
    """

    name: str
    url: str = ""
    size: Optional[int] = None
    sha256: Optional[str] = None
    md5: Optional[str] = None
    drive_id: Optional[str] = None
    unpack_to: Optional[str] = None
    contains: str = ""
    n_files: Optional[int] = None

    @property
    def checksummed(self) -> bool:
        return bool(self.sha256 or self.md5)

    def official_url(self) -> str:
        return _DRIVE_URL.format(id=self.drive_id) if self.drive_id else self.url


@dataclass(frozen=True)
class DataSource:
    """A data set ``gem data`` knows: its files, where its recipe reads them, and its terms."""

    name: str
    files: tuple[RemoteFile, ...]
    root: str
    size: str
    source: str
    terms: str
    mirror: str = ""


# The sizes and sha256 digests of CelebA are those of tensorflow_datasets
# (tensorflow_datasets/datasets/celeb_a/checksums.tsv), the md5 digests and Drive ids those of
# torchvision (torchvision/datasets/celeba.py, CelebA.file_list). 202,599 aligned faces is the
# count the CelebA page publishes.
_CELEBA = DataSource(
    name="celeba",
    files=(
        RemoteFile("img_align_celeba.zip", size=1443490838,
                   sha256="46fb89443c578308acf364d7d379fe1b9efb793042c0af734b6112e4fd3a8c74",
                   md5="00d2c5bc6d35e252742224ab0c1e8fcb", drive_id="0B7EVK8r0v71pZjFTYXZWM3FlRnM",
                   unpack_to="img_align_celeba", contains="000001.jpg", n_files=202599),
        RemoteFile("list_attr_celeba.txt", size=26721026,
                   sha256="f0e5da289d5ccf75ffe8811132694922b60f2af59256ed362afa03fefba324d0",
                   md5="75e246fa4810816ffd6ee81facbd244c", drive_id="0B7EVK8r0v71pblRyaVFSWGxPY0U"),
        RemoteFile("list_landmarks_align_celeba.txt", size=12156055,
                   sha256="6c02a87569907f6db2ba99019085697596730e8129f67a3d61659f198c48d43b",
                   md5="cc24ecafdb5b50baae59b03474781f8c", drive_id="0B7EVK8r0v71pd0FJY3Blby1HUTQ"),
        RemoteFile("list_eval_partition.txt", size=2836386,
                   sha256="fc955bcb3ef8fbdf7d5640d9a8693a8431b5f2ee291a5c1449a1549e7e073fe7",
                   md5="d32c9cbf5e040fd4025c592c306e6668", drive_id="0B7EVK8r0v71pY0NSMzRuSXJEVkk"),
    ),
    root="data/celeba",
    size="1.4 GB",
    source="Google Drive of mmlab.ie.cuhk.edu.hk/projects/CelebA.html",
    terms="non-commercial research and education only (CelebA agreement)",
    mirror="--mirror hf:OWNER/REPO (a Hugging Face dataset repository holding the same files)",
)

# Size and sha256 of tensorflow_datasets (tensorflow_datasets/datasets/shapes3d/checksums.tsv).
_SHAPES3D = DataSource(
    name="shapes3d",
    files=(RemoteFile("3dshapes.h5", url="https://storage.googleapis.com/3d-shapes/3dshapes.h5", size=267573662,
                      sha256="0a0f6ed98baff276a50f3a081a7434d788da63cb135a98189b2a5b5769be1785"),),
    root="data/shapes3d",
    size="255 MB",
    source="storage.googleapis.com/3d-shapes (google-deepmind/3d-shapes)",
    terms="Apache 2.0 (google-deepmind/3d-shapes)",
)

# The md5 of the npz is the one published dSprites loaders record (for example vaetc's and
# latte's dsprites modules). No loader records its size, so the size is not checked; disent
# and tensorflow_datasets record hashes of the .hdf5 copy only, which the plugin does not read.
_DSPRITES = DataSource(
    name="dsprites",
    files=(RemoteFile("dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
                      url="https://github.com/google-deepmind/dsprites-dataset/raw/master/"
                          "dsprites_ndarray_co1sh3sc6or40x32y32_64x64.npz",
                      md5="7da33b31b13a06f4b04a70402ce90c2e"),),
    root="data/dsprites",
    size="26 MB",
    source="github.com/google-deepmind/dsprites-dataset",
    terms="Apache 2.0 (google-deepmind/dsprites-dataset)",
)

# LSUN publishes neither sizes nor checksums (fyu/lsun download.py / download_objects.py give the
# URLs): only the zip's own CRCs are checked, while unpacking.
_LSUN_TERMS = "web images; no licence stated, research use (github.com/fyu/lsun)"
_LSUN_HORSE = DataSource(
    name="lsun_horse",
    files=(RemoteFile("horse.zip", url="http://dl.yf.io/lsun/objects/horse.zip",
                      unpack_to="horse", contains="data.mdb"),),
    root="data/lsun",
    size="about 70 GB",
    source="dl.yf.io/lsun/objects (no published checksum)",
    terms=_LSUN_TERMS,
)
_LSUN_BEDROOM = DataSource(
    name="lsun_bedroom",
    files=(RemoteFile("bedroom_train_lmdb.zip", url="http://dl.yf.io/lsun/scenes/bedroom_train_lmdb.zip",
                      unpack_to="bedroom_train_lmdb", contains="data.mdb"),),
    root="data/lsun",
    size="about 43 GB",
    source="dl.yf.io/lsun/scenes (no published checksum)",
    terms=_LSUN_TERMS,
)

#: The data sets ``gem data`` knows, by name (the name of the recipe that reads each).
SOURCES: dict[str, DataSource] = {s.name: s for s in (_CELEBA, _SHAPES3D, _DSPRITES, _LSUN_HORSE, _LSUN_BEDROOM)}


class DownloadError(GemError, OSError):
    """A download or unpack failed; the message says why and what to do."""


class ChecksumError(DownloadError):
    """A file's size or checksum differs from the published value."""


class _Transient(Exception):
    """A failure worth another try (a dropped connection, a 5xx, a timeout)."""


def download_command(name: str, root: Any) -> str:
    """The command that downloads data set ``name`` into ``root``."""
    return f"gem data download {name} --root {shlex.quote(str(root))}"


def _source(name: str) -> DataSource:
    try:
        return SOURCES[name]
    except KeyError:
        raise DownloadError(f"unknown data set {name!r}; known: {', '.join(SOURCES)}") from None


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


# ----------------------------------------------------------------------------------------------
# The record of verified files


def _read_record(root: Path) -> dict[str, Any]:
    try:
        return json.loads((root / RECORD_FILE).read_text()).get("files", {})
    except (OSError, ValueError, AttributeError):
        return {}


def _write_record(root: Path, name: str, entry: Optional[dict[str, Any]]) -> None:
    files = _read_record(root)
    if entry is None:
        files.pop(name, None)
    else:
        files[name] = entry
    write_json(root / RECORD_FILE, {"files": files})


# ----------------------------------------------------------------------------------------------
# Checksums


def _digests(path: Path, remote: RemoteFile, label: str) -> dict[str, str]:
    """sha256 (always, for naming a bad file) and md5 (when recorded) of ``path``, with progress."""
    hashes = {"sha256": hashlib.sha256()}
    if remote.md5:
        hashes["md5"] = hashlib.md5()
    size = path.stat().st_size
    with open(path, "rb") as fh, progress(size, f"{label}: checking {path.name}", unit="B",
                                          unit_scale=True, unit_divisor=1024) as bar:
        while chunk := fh.read(_CHUNK):
            for h in hashes.values():
                h.update(chunk)
            bar.update(len(chunk))
    return {k: h.hexdigest() for k, h in hashes.items()}


def _mismatch(path: Path, remote: RemoteFile, label: str) -> tuple[Optional[str], dict[str, str]]:
    """(what differs from the published values or None, the digests)."""
    size = path.stat().st_size
    if remote.size is not None and size != remote.size:
        return f"size is {size} bytes, the published file has {remote.size}", {}
    digests = _digests(path, remote, label)
    for algo in ("sha256", "md5"):
        expected = getattr(remote, algo)
        if expected and digests[algo] != expected.lower():
            return f"{algo} is {digests[algo]}, the published file has {expected}", digests
    return None, digests


def _checked(remote: RemoteFile) -> list[str]:
    return [k for k in ("size", "sha256", "md5") if getattr(remote, k)]


def _set_aside(path: Path, digests: dict[str, str]) -> Path:
    """Rename a file that failed verification to ``<name>.bad-<sha8>`` next to its target."""
    sha = digests.get("sha256") or _digests(path, RemoteFile(path.name), "bad file")["sha256"]
    base = path.name[:-len(".part")] if path.name.endswith(".part") else path.name
    bad = path.with_name(f"{base}.bad-{sha[:8]}")
    os.replace(path, bad)
    return bad


# ----------------------------------------------------------------------------------------------
# HTTP


def _host(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc or url


def _looks_like_html(first: bytes) -> bool:
    head = first[:512].lstrip().lower()
    return head.startswith((b"<!doctype", b"<html")) or b"<html" in head[:200]


def _open(url: str, offset: int = 0) -> Any:
    """A response for ``url`` from byte ``offset``; raises _Transient or DownloadError."""
    headers = {"User-Agent": "gem-data/1"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        if exc.code == 416:
            return exc  # the range starts at the end: the caller decides
        if exc.code >= 500 or exc.code == 429:
            raise _Transient(f"HTTP {exc.code} from {_host(url)}") from None
        raise DownloadError(f"HTTP {exc.code} {exc.reason} for {url}: the file is not there (moved or "
                            f"withdrawn?)") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, (socket.timeout, TimeoutError, ConnectionResetError, ConnectionAbortedError)):
            raise _Transient(f"{reason} from {_host(url)}") from None
        raise _Unreachable(url, reason) from None
    except (socket.timeout, TimeoutError, ConnectionResetError, HTTPException) as exc:
        raise _Transient(f"{type(exc).__name__}: {exc} from {_host(url)}") from None


class _Unreachable(DownloadError):
    def __init__(self, url: str, reason: Any):
        super().__init__(f"cannot reach {_host(url)} ({reason}) for {url}. Check the network connection "
                         f"(and HTTPS_PROXY behind a proxy), or set {MIRROR_ENV} to a mirror")
        self.url = url


def _quota_message(label: str, url: str, page: bytes) -> str:
    title = re.search(rb"<title>(.*?)</title>", page, re.S | re.I)
    said = html.unescape(title.group(1).decode("utf-8", "replace").strip()) if title else "a web page"
    quota = re.search(rb"quota|too many users", page, re.I)
    what = ("Google Drive's download quota for this file is used up for now" if quota
            else f"the server answered with a web page ({said!r}) instead of the file")
    return (f"{label}: {what} ({url}). Nothing was saved. Try again in some hours, use a mirror "
            f"({MIRROR_ENV}=URL, or --mirror hf:OWNER/REPO with huggingface_hub), or download the "
            f"file by hand into the data set's folder and run `gem data verify {label}`")


def _drive_url(label: str, url: str) -> str:
    """The address that serves a Google Drive file: the one given, or the one its confirm page
    (Drive's "cannot scan this file for viruses" page of large files) points to."""
    response = _open(url)
    try:
        ctype = response.headers.get("Content-Type", "")
        if "text/html" not in ctype:
            return url
        page = response.read(2 << 20)
    finally:
        response.close()
    form = re.search(rb'<form[^>]*id="download-form"[^>]*action="([^"]+)"', page)
    if form:
        action = html.unescape(form.group(1).decode())
        fields = re.findall(rb'<input[^>]*type="hidden"[^>]*name="([^"]+)"[^>]*value="([^"]*)"', page)
        query = urllib.parse.urlencode([(html.unescape(k.decode()), html.unescape(v.decode())) for k, v in fields])
        return urllib.parse.urljoin(url, action) + ("?" + query if query else "")
    token = re.search(rb"confirm=([0-9A-Za-z_-]+)", page)
    if token:
        return f"{url}&confirm={token.group(1).decode()}"
    raise DownloadError(_quota_message(label, url, page))


def _write(fh: Any, chunk: bytes) -> None:
    """One write of the download (a function of its own so that tests can make it fail)."""
    fh.write(chunk)


def _fetch(url: str, part: Path, size: Optional[int], label: str, drive: bool = False) -> None:
    """Download ``url`` into ``part``, resuming what is there, retrying transient failures."""
    tries = 0
    while True:
        before = part.stat().st_size if part.exists() else 0
        try:
            target = _drive_url(label, url) if drive else url
            _fetch_once(target, part, size, label)
            return
        except _Transient as exc:
            have = part.stat().st_size if part.exists() else 0
            tries = 0 if have > before else tries + 1  # progress earns the retries back
            if tries > len(RETRY_DELAYS):
                raise DownloadError(f"{label}: {url} keeps failing ({exc}); {_mb(have)} are kept in {part}; "
                                    f"run the same command again later to resume") from None
            delay = RETRY_DELAYS[max(tries - 1, 0)] if tries else 0.0
            logger.warning(f"{label}: {exc}; resuming from byte {have}" + (f" in {delay:g} s" if delay else ""))
            time.sleep(delay)


def _fetch_once(url: str, part: Path, size: Optional[int], label: str) -> None:
    have = part.stat().st_size if part.exists() else 0
    if size is not None and have == size:
        return  # complete already: an interruption came between the last byte and the check
    if size is not None and have > size:
        part.unlink()
        have = 0
    response = _open(url, have)
    if getattr(response, "code", None) == 416:  # nothing after `have`: complete, or a stale .part
        response.close()
        if size is None or have == size:
            return
        part.unlink()
        raise _Transient("the server refused the range of a stale partial file; starting again")
    with response:
        if have and response.status == 200:
            logger.info(f"{label}: {_host(url)} ignores ranges; downloading {part.name[:-5]} from the start")
            have = 0
        elif response.status == 206:
            start = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not start or int(start.group(1)) != have:
                raise DownloadError(f"{label}: {_host(url)} answered range {have}- with "
                                    f"{response.headers.get('Content-Range')!r}; delete {part} and run again")
        length = response.headers.get("Content-Length")
        total = have + int(length) if length and length.isdigit() else size
        try:
            first = response.read(_CHUNK)
        except (socket.timeout, TimeoutError, ConnectionError, HTTPException) as exc:
            raise _Transient(f"connection dropped at byte {have} ({type(exc).__name__})") from None
        if "text/html" in response.headers.get("Content-Type", "") or (not have and _looks_like_html(first)):
            raise DownloadError(_quota_message(label, url, first))
        free = shutil.disk_usage(part.parent).free
        if total is not None and total - have > free:
            raise DownloadError(_disk_full(label, part, total, have, free))
        _stream(response, first, part, have, total, label)


def _disk_full(label: str, part: Path, total: int, have: int, free: Optional[int] = None) -> str:
    room = f" ({_mb(free)} free)" if free is not None else ""
    return (f"{label}: no space left on the disk of {part.parent}{room}: {part.name[:-5]} needs "
            f"{_mb(total - have)} more ({total} bytes in all). {_mb(have)} are kept in {part}; free some space "
            f"and run the same command again to resume")


def _stream(response: Any, first: bytes, part: Path, have: int, total: Optional[int], label: str) -> None:
    """Append the body to ``part`` with progress (bytes, speed, time left)."""
    start, t0 = have, time.perf_counter()
    with open(part, "ab" if have else "wb") as fh, \
            progress(total, f"{label}: {part.name[:-5]}", unit="B", unit_scale=True, unit_divisor=1024,
                     initial=have) as bar:
        if hasattr(bar, "started"):  # plain-line progress: show the resumed bytes and the speed
            bar.update(have)
        chunk = first
        try:
            while True:
                if not chunk:
                    try:
                        chunk = response.read(_CHUNK)
                    except (socket.timeout, TimeoutError, ConnectionError, HTTPException) as exc:
                        raise _Transient(f"connection dropped after {_mb(have)} ({type(exc).__name__})") from None
                    if not chunk:
                        break
                try:
                    _write(fh, chunk)
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:
                        fh.flush()
                        raise DownloadError(_disk_full(label, part, total or have + len(chunk), have)) from None
                    raise
                have += len(chunk)
                bar.update(len(chunk))
                if hasattr(bar, "started"):
                    speed = (have - start) / max(time.perf_counter() - t0, 1e-6)
                    bar.set_postfix(speed=f"{speed / 1e6:.1f} MB/s")
                chunk = b""
        except KeyboardInterrupt:
            fh.flush()
            raise KeyboardInterrupt(f"{_mb(have)} of {part.name[:-5]} are kept in {part}; "
                                    f"the same command resumes from there") from None
    if total is not None and have < total:
        raise _Transient(f"connection closed after {have} of {total} bytes")


def _fetch_hf(repo: str, remote: RemoteFile, part: Path, label: str) -> None:
    """Fetch a file from a Hugging Face dataset repository into ``part`` (huggingface_hub resumes)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        raise MissingDependencyError(f"{label}: --mirror hf:{repo} downloads through huggingface_hub, which is "
                                     f"not installed: pip install huggingface_hub") from None
    with tempfile.TemporaryDirectory(prefix=".hf-", dir=part.parent) as tmp:
        try:
            path = hf_hub_download(repo_id=repo, filename=remote.name, repo_type="dataset", local_dir=tmp)
        except Exception as exc:  # huggingface_hub raises many kinds; all end the same way here
            raise DownloadError(f"{label}: could not fetch {remote.name} from the Hugging Face dataset "
                                f"{repo}: {type(exc).__name__}: {exc}") from None
        os.replace(path, part)


# ----------------------------------------------------------------------------------------------
# Install, verify, status


def _url(source: DataSource, remote: RemoteFile, mirror: Optional[str]) -> str:
    if mirror:
        return f"{mirror.rstrip('/')}/{source.name}/{urllib.parse.quote(remote.name)}"
    return remote.official_url()


def _unpack(archive: Path, root: Path, remote: RemoteFile, label: str) -> int:
    """Unzip into a temporary folder, move the folder holding ``remote.contains`` to its target."""
    target = root / str(remote.unpack_to)
    tmp = Path(tempfile.mkdtemp(prefix=f".{archive.name}.unpack-", dir=root))
    try:
        with zipfile.ZipFile(archive) as zf:
            members = zf.infolist()
            with progress(len(members), f"{label}: unpacking {archive.name}", unit="file") as bar:
                for member in members:
                    zf.extract(member, tmp)  # checks each member's CRC
                    bar.update(1)
        found = sorted((p.parent for p in tmp.rglob(remote.contains)), key=lambda p: len(p.parts))
        if not found:
            raise DownloadError(f"{label}: {archive} holds no {remote.contains}; it is not the published archive")
        os.replace(found[0], target)
        return sum(1 for p in target.rglob("*") if p.is_file())
    except zipfile.BadZipFile as exc:
        raise DownloadError(f"{label}: {archive} is damaged ({exc}); delete it and run the same command "
                            f"again") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DownloadError(f"{label}: no space left on the disk of {root} while unpacking {archive.name} "
                                f"(about {_mb(sum(m.file_size for m in members))} needed); nothing was unpacked; "
                                f"free some space and run the same command again") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _install(source: DataSource, remote: RemoteFile, root: Path, mirror: Optional[str]) -> str:
    """Make ``remote`` present and verified under ``root``; returns what happened, in a line."""
    label = source.name
    record = _read_record(root).get(remote.name)
    final = root / remote.name
    if remote.unpack_to:
        target = root / remote.unpack_to
        if target.is_dir() and record and record.get("unpacked"):
            return f"{target}: present (unpacked from {remote.name}, verified {'+'.join(record['checked'])})"
        if target.exists():  # filled by hand: check it, never overwrite it
            good, line = _verify_folder(root, remote)
            if good:
                return line.split(None, 1)[1] + " (already there, not downloaded)"
            raise DownloadError(f"{label}: {target} is there but incomplete ({line.split(None, 1)[1]}); move it "
                                f"away and run the same command again to download it")
    elif final.is_file():
        problem, digests = _mismatch(final, remote, label)
        if problem is None:
            _write_record(root, remote.name, _entry(final, remote))
            return f"{final}: present and verified ({'+'.join(_checked(remote)) or 'no published checksum'})"
        bad = _set_aside(final, digests)
        logger.warning(f"{label}: {final} does not match ({problem}); moved aside to {bad.name}, downloading anew")
    if not final.is_file():  # an archive may already lie there, complete, from an earlier interrupted unpack
        part = root / f"{remote.name}.part"
        if mirror and mirror.startswith("hf:"):
            _fetch_hf(mirror[3:], remote, part, label)
        else:
            url = _url(source, remote, mirror)
            logger.info(f"{label}: {remote.name} from {url}")
            try:
                _fetch(url, part, remote.size, label, drive=bool(remote.drive_id) and not mirror)
            except _Unreachable as exc:
                raise DownloadError(f"{label}: {exc}. Or download {remote.name} by hand into {root} and run "
                                    f"`gem data verify {label} --root {shlex.quote(str(root))}`") from None
        problem, digests = _mismatch(part, remote, label)
        if problem is not None:
            bad = _set_aside(part, digests)
            raise ChecksumError(f"{label}: {remote.name} is not the published file: {problem}. It is kept aside "
                                f"as {bad} and not used. Run the same command again to download it anew; if it "
                                f"fails the same way, the source has changed: report it")
        os.replace(part, final)
    else:
        problem, digests = _mismatch(final, remote, label)
        if problem is not None:
            bad = _set_aside(final, digests)
            raise ChecksumError(f"{label}: {final} is not the published file ({problem}); kept aside as {bad}")
    if remote.unpack_to:
        count = _unpack(final, root, remote, label)
        _write_record(root, remote.name, {**_entry(None, remote), "unpacked": remote.unpack_to, "files": count})
        final.unlink()
        return f"{root / remote.unpack_to}: unpacked {count} files from {remote.name}"
    _write_record(root, remote.name, _entry(final, remote))
    return f"{final}: downloaded and verified ({'+'.join(_checked(remote)) or 'no published checksum'})"


def _entry(path: Optional[Path], remote: RemoteFile) -> dict[str, Any]:
    entry: dict[str, Any] = {"checked": _checked(remote) or ["zip CRC"], "sha256": remote.sha256, "md5": remote.md5,
                             "size": remote.size}
    if path is not None:
        stat = path.stat()
        entry.update(size=stat.st_size, mtime_ns=stat.st_mtime_ns)
    return entry


def download(name: str, root: Optional[Any] = None, mirror: Optional[str] = None) -> list[str]:
    """Download, verify and unpack data set ``name`` into ``root`` (default: its recipe's folder).

    ``mirror`` (default: ``$GEM_DATA_MIRROR``) is a base URL serving ``<name>/<file>``, or
    ``hf:OWNER/REPO`` for a Hugging Face dataset repository. Returns one line per file.
    """
    source = _source(name)
    folder = Path(root if root is not None else source.root).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    mirror = mirror or os.environ.get(MIRROR_ENV) or None
    return [_install(source, remote, folder, mirror) for remote in source.files]


def verify(name: str, root: Optional[Any] = None) -> tuple[bool, list[str]]:
    """Check the files of data set ``name`` under ``root`` against the published values.

    Returns (all good, one line per file). A plain file is checked by size and checksum; an
    unpacked folder by its file count (the published count, or the one recorded when unpacked).
    A folder filled by hand that passes is recorded as verified.
    """
    source = _source(name)
    folder = Path(root if root is not None else source.root).expanduser()
    ok, lines = True, []
    for remote in source.files:
        if remote.unpack_to:
            good, line = _verify_folder(folder, remote)
        else:
            good, line = _verify_file(source, folder, remote)
        ok &= good
        lines.append(line)
    if not ok:
        lines.append(f"fix: {download_command(source.name, folder)}")
    return ok, lines


def _verify_file(source: DataSource, folder: Path, remote: RemoteFile) -> tuple[bool, str]:
    path = folder / remote.name
    if not path.is_file():
        return False, f"MISSING {path}"
    problem, _ = _mismatch(path, remote, source.name)
    if problem is not None:
        _write_record(folder, remote.name, None)
        return False, f"BAD     {path}: {problem}"
    _write_record(folder, remote.name, _entry(path, remote))
    checked = "+".join(_checked(remote)) or "present; no published size or checksum to check"
    return True, f"OK      {path} ({checked})"


def _verify_folder(folder: Path, remote: RemoteFile) -> tuple[bool, str]:
    target = folder / str(remote.unpack_to)
    if not target.is_dir():
        return False, f"MISSING {target}/"
    count = sum(1 for p in target.rglob("*") if p.is_file())
    if not any(target.rglob(remote.contains)):
        return False, f"BAD     {target}/: holds no {remote.contains}"
    record = _read_record(folder).get(remote.name) or {}
    expected = remote.n_files if remote.n_files is not None else record.get("files")
    if expected is not None and count < expected:
        return False, f"BAD     {target}/: {count} files, expected {expected}"
    if remote.n_files is None:
        when = f"{count} files, as when unpacked" if expected is not None else f"{count} files"
        return True, f"OK      {target}/ ({when}; no published checksum or file count to check it against)"
    if not record:
        _write_record(folder, remote.name, {**_entry(None, remote), "checked": ["file count"],
                                            "unpacked": remote.unpack_to, "files": count})
    return True, f"OK      {target}/ ({count} files, as published)"


def status(source: DataSource, root: Path) -> str:
    """One word or phrase for ``gem data list``: verified, unverified, partial, missing."""
    record = _read_record(root)
    states, partial = [], 0
    for remote in source.files:
        entry = record.get(remote.name)
        part = root / f"{remote.name}.part"
        partial += part.stat().st_size if part.is_file() else 0
        if remote.unpack_to:
            present = (root / remote.unpack_to).is_dir()
            verified = present and bool(entry)
        else:
            path = root / remote.name
            present = path.is_file()
            verified = present and bool(entry) and entry.get("mtime_ns") == path.stat().st_mtime_ns \
                and entry.get("size") == path.stat().st_size
        states.append("verified" if verified else "present" if present else "missing")
    if all(s == "verified" for s in states):
        checksummed = all(r.checksummed for r in source.files)
        return "present, verified" if checksummed else "present, zip CRCs checked (no published checksum)"
    if all(s != "missing" for s in states):
        return f"present, unverified (gem data verify {source.name})"
    if partial:
        return f"partial download {_mb(partial)}"
    if all(s == "missing" for s in states):
        return "missing"
    return "incomplete: " + ", ".join(r.name for r, s in zip(source.files, states) if s == "missing") + " missing"


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gem data", description="Download, verify and list the data sets of the "
                                                                  "recipes (see docs/datasets.md).")
    sub = parser.add_subparsers(dest="action", required=True)
    p_list = sub.add_parser("list", help="each data set: size, source, terms, folder, status")
    p_list.add_argument("--root", help="the folder that holds the data sets' folders (default: data)")
    p_down = sub.add_parser("download", help="download, verify and unpack a data set (resumes; a second call "
                                             "only verifies)")
    p_down.add_argument("name", help=f"one of {', '.join(SOURCES)}")
    p_down.add_argument("--root", help="the data set's folder (default: the recipe's, e.g. data/dsprites)")
    p_down.add_argument("--mirror", help=f"base URL serving <name>/<file> (default: ${MIRROR_ENV}), or "
                                         f"hf:OWNER/REPO for a Hugging Face dataset repository")
    p_ver = sub.add_parser("verify", help="check the sizes and checksums of a data set's files")
    p_ver.add_argument("name", help=f"one of {', '.join(SOURCES)}")
    p_ver.add_argument("--root", help="the data set's folder (default: the recipe's)")
    for p in (p_list, p_down, p_ver):
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        add_verbosity_options(p)
    return parser


def _list(parent: Optional[str]) -> int:
    rows = [("name", "size", "source", "terms", "folder", "status")]
    for source in SOURCES.values():
        folder = Path(parent) / Path(source.root).name if parent else Path(source.root)
        rows.append((source.name, source.size, source.source, source.terms, str(folder), status(source, folder)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    mirrors = [f"{s.name}: {s.mirror}" for s in SOURCES.values() if s.mirror]
    print(f"\nmirror: set {MIRROR_ENV}=URL (serving <name>/<file>) or pass --mirror; "
          + "; ".join(mirrors) if mirrors else "")
    return 0


def data_main(argv: Optional[Sequence[str]] = None) -> int:
    """``gem data list | download NAME | verify NAME``."""
    args = _parser().parse_args(argv)
    setup_from_args(args)

    def run() -> int:
        if args.action == "list":
            return _list(args.root)
        if args.action == "download":
            for line in download(args.name, args.root, args.mirror):
                print(line)
            return 0
        ok, lines = verify(args.name, args.root)
        for line in lines:
            print(line)
        if not ok:
            raise ChecksumError(f"{args.name}: verification failed: "
                                + "; ".join(line.lower().split(None, 1)[0] + " " + line.split(None, 1)[1]
                                            for line in lines if line.startswith(("BAD", "MISSING"))))
        return 0

    return guard(run, args.debug, "gem data")

