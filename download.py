"""PG19 download from DeepMind's public `deepmind-gutenberg` bucket on Google Cloud Storage, every file verified.

What it downloads: one PG19 split (`train`, `validation` or `test`: 28,602 / 50 / 100 books) plus the
`metadata.csv` beside it. The objects are listed with the GCS JSON API
(`{base_url}/storage/v1/b/{bucket}/o?prefix=validation/`, paged by `nextPageToken`) and fetched from
`{base_url}/{bucket}/{name}`. Only the standard library and tqdm are used, so this module loads at once.

Layout written under OUT (PG19's own, what data.py reads):
    OUT/metadata.csv
    OUT/<split>/<book id>.txt
    OUT/<split>/<book id>.txt.part   while it downloads, or after an interrupted run (resumed by the next one)
    OUT/.pg19-verified.json          stamps of the files already verified (see below)

Verification rule (nothing is kept on trust, size alone is never enough):
- Every listing item carries `size`, `md5Hash` (base64 of the 16-byte MD5) and `crc32c` (base64 of the
  big-endian 4-byte CRC32C). The MD5 is used when present; composite objects have none, and then the
  CRC32C is (implemented here in pure Python, about 8 MB/s).
- An item with neither checksum is refused before anything is downloaded, unless the caller opts in with
  `allow_unverified=True` (`--allow-unverified`): such files are then accepted on their size alone, and
  each one is named in a warning on every run. Files that have a checksum are verified regardless.
- Bytes are written to `<name>.part` and hashed as they arrive; a resumed `.part` has its prefix re-hashed
  first, so a finished file is read once. The `.part` is renamed to `<name>` only when its size and
  checksum both match the listing: a file under its final name has always been verified.
- A mismatch (same-size wrong content, an HTML page instead of the book, a `.part` from another source
  that a resume spliced onto) deletes the `.part` and restarts the file from byte 0; that counts as one
  attempt. Once the attempts are used up: ValueError naming the URL with the expected and received
  checksums, and no file under the final name.
- A file already under its final name is verified against the listing too. It is hashed unless its stamp
  in `.pg19-verified.json` (size, mtime_ns, ctime_ns and the checksum it matched, recorded right after
  verification) still fits; any write since changes ctime (even when mtime is put back), and a new
  checksum in the listing (the object was replaced) no longer fits either, so such a file is hashed again.
  A file that does not match (stale or damaged) is deleted, said so in a log line, and downloaded again.

Network rules:
- `timeout` (default 30 s) is the connect timeout and the per-read stall limit: a server that accepts
  the connection and never answers, or stops sending, fails the attempt after `timeout` seconds.
- `min_rate` (default 1024 bytes/s) averaged over the last `rate_window` seconds (default 30 s): a
  transfer slower than that is cut, which catches the server that trickles a byte now and then and so
  never trips the stall timeout. The defaults only cut what would take days (a 1 MB book at under 1 KB/s);
  any real connection, even a congested mobile one, is far faster. `min_rate=0` turns the rule off.
- A cut connection, a stall, a too-slow transfer, HTTP 429 / 5xx and connection errors are retried
  `retries` times (default 5) after `backoff * 2**k` seconds, resuming with an HTTP Range request. A
  server that ignores Range (200 instead of 206) restarts the file from byte 0, and so does a 416.
- A listing that is not JSON (a captive portal's or a proxy's HTML page) is a ValueError naming the URL,
  so are malformed items and unsafe object names (absolute, `..`, backslashes): nothing is written then.

Errors: ValueError (bad data or listing) or OSError (network, disk), each a single line naming the URL or
file. Nothing half-written is ever left under a final name.

Command line:
    python download.py pg19 --split validation --out data/pg19 [--base-url URL] [--bucket NAME]
        [--timeout S] [--min-rate BYTES_PER_S] [--rate-window S] [--retries N] [--allow-unverified]
        [--no-progress]
"""
from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import hashlib
import http.client
import json
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

import atomic
import cli

PG19_SPLITS = ("train", "validation", "test")
DEFAULT_BASE_URL = "https://storage.googleapis.com"
DEFAULT_BUCKET = "deepmind-gutenberg"
STAMP_FILE = ".pg19-verified.json"
CHUNK = 1 << 20
MAX_LISTING_PAGE = 256 << 20  # a page of 1,000 items is ~1 MB; anything far larger is not a GCS listing


# ----------------------------------------------------------------------------------------------------
# Checksums
# ----------------------------------------------------------------------------------------------------

def crc32c_table() -> list[int]:
    """table[b]: the reflected CRC32C register after shifting byte b through it (Castagnoli, 0x82F63B78)."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


CRC32C_TABLE = crc32c_table()


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C of data, continuing from the CRC of the bytes before it: crc32c(b, crc32c(a)) == crc32c(a + b)."""
    table = CRC32C_TABLE
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


class Crc32c:
    """hashlib-style incremental CRC32C; digest() is big-endian, as GCS encodes it."""

    def __init__(self, data: bytes = b""):
        self.crc = crc32c(data)

    def update(self, data: bytes) -> None:
        self.crc = crc32c(data, self.crc)

    def digest(self) -> bytes:
        return self.crc.to_bytes(4, "big")


class SizeOnly:
    """The hasher of an object the listing gives no checksum for (accepted only with allow_unverified)."""

    def update(self, data: bytes) -> None:
        pass

    def digest(self) -> bytes:
        return b""


@dataclass(frozen=True)
class Checksum:
    kind: str      # "md5" or "crc32c"
    digest: bytes  # raw bytes (16 for md5, 4 for crc32c)

    def hasher(self):
        return hashlib.md5() if self.kind == "md5" else Crc32c()

    def __str__(self) -> str:
        return f"{self.kind} {self.digest.hex()}"


def new_hasher(checksum: Checksum | None):
    return checksum.hasher() if checksum else SizeOnly()


def hash_file(path: Path, checksum: Checksum | None, limit: int | None = None, bar=None):
    """A hasher fed with the first `limit` bytes of path (the whole file when None)."""
    hasher = new_hasher(checksum)
    left = float("inf") if limit is None else limit
    with open(path, "rb") as f:
        while left > 0 and (chunk := f.read(int(min(CHUNK, left)))):
            hasher.update(chunk)
            left -= len(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return hasher


def base64_digest(text, length: int, field: str) -> bytes:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raw = None
    if raw is None or len(raw) != length:
        raise ValueError(f"{field} is not the base64 of {length} bytes: {text!r}")
    return raw


def listed_checksum(item: dict) -> Checksum | None:
    """The checksum to verify an object with: its MD5 when the listing has one, else its CRC32C."""
    if item.get("md5Hash") is not None:
        return Checksum("md5", base64_digest(item["md5Hash"], 16, "md5Hash"))
    if item.get("crc32c") is not None:
        return Checksum("crc32c", base64_digest(item["crc32c"], 4, "crc32c"))
    return None


# ----------------------------------------------------------------------------------------------------
# HTTP with timeouts, a minimum rate and retries
# ----------------------------------------------------------------------------------------------------

class TransientError(Exception):
    """A failure worth another attempt. `final` is what it becomes once the attempts are used up."""
    final = OSError


class BadResponse(TransientError):
    """The response does not announce the listed object (wrong length or range); the .part is left alone."""
    final = ValueError


class Mismatch(TransientError):
    """The finished bytes are not the listed object (size or checksum): the .part goes, the file restarts at 0."""
    final = ValueError


class RangeNotSatisfiable(TransientError):
    """HTTP 416: our .part does not fit the remote object; it is restarted from byte 0."""


class HttpError(OSError):
    """An HTTP status that another attempt will not change (404, 403, ...)."""


# What a flaky network raises while connecting or reading (HTTPError, a URLError, is sorted out first).
# socket.timeout is TimeoutError; ssl.SSLError covers a TLS connection cut mid-record.
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException, ssl.SSLError)


@dataclass(frozen=True)
class Network:
    timeout: float = 30.0      # connect and per-read stall limit, seconds
    retries: int = 5           # further attempts after the first
    backoff: float = 1.0       # seconds before the first retry, doubled for each next one
    min_rate: float = 1024.0   # bytes/s over rate_window below which a transfer is cut (0: never)
    rate_window: float = 30.0  # seconds

    def __post_init__(self):
        cli.check_range("--timeout", self.timeout, 0, open_low=True)
        if isinstance(self.retries, bool) or not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"--retries must be a non-negative integer, got {self.retries!r}")
        cli.check_range("--backoff", self.backoff, 0)
        cli.check_range("--min-rate", self.min_rate, 0)
        cli.check_range("--rate-window", self.rate_window, 0, open_low=True)

    def rate_guard(self) -> RateGuard:
        return RateGuard(self.min_rate, self.rate_window)


class RateGuard:
    """Cuts a transfer whose mean rate over the last `window` seconds is below `min_rate` bytes/s.

    The socket timeout catches a server that stops sending; this catches one that sends a byte now and then,
    which never trips a timeout and would take days.
    """

    def __init__(self, min_rate: float, window: float, clock=time.monotonic):
        self.min_rate, self.window, self.clock = min_rate, window, clock
        self.total = 0
        # (time, bytes received by then), spaced ~window/16 apart so the deque stays small at any speed
        self.samples = deque([(clock(), 0)])

    def add(self, n: int) -> None:
        self.total += n
        if not self.min_rate:
            return
        now = self.clock()
        if now - self.samples[-1][0] >= self.window / 16:
            self.samples.append((now, self.total))
        while len(self.samples) > 1 and now - self.samples[1][0] >= self.window:
            self.samples.popleft()
        since, then = self.samples[0]
        if now - since >= self.window:
            rate = (self.total - then) / (now - since)
            if rate < self.min_rate:
                raise TransientError(f"too slow: {rate:.0f} B/s over the last {now - since:.1f} s, "
                                     f"below the minimum rate of {self.min_rate:g} B/s")


def network_problem(e: BaseException, timeout: float) -> str:
    reason = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(reason, TimeoutError):
        return f"no answer within the {timeout:g} s timeout"
    return str(reason) or type(reason).__name__


def open_url(url: str, timeout: float, headers: dict | None = None):
    """The response to GET url; 429/5xx and connection errors as TransientError, other statuses HttpError."""
    # identity: hash the stored bytes, never a transcoding of them
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity", **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416:
            raise RangeNotSatisfiable("HTTP 416 range not satisfiable") from None
        if e.code == 429 or e.code >= 500:
            raise TransientError(f"HTTP {e.code} {e.reason}") from None
        raise HttpError(f"{url}: HTTP {e.code} {e.reason}") from None
    except NETWORK_ERRORS as e:
        raise TransientError(network_problem(e, timeout)) from None


def copy_body(resp, sink, guard: RateGuard, limit: int) -> int:
    """Feeds the body to sink(chunk) until EOF or just past `limit` bytes; returns the bytes read.

    read1 returns what has arrived instead of waiting for a full chunk, so the rate guard sees a trickle.
    """
    n = 0
    while n <= limit and (chunk := resp.read1(min(CHUNK, limit - n + 1))):
        sink(chunk)
        n += len(chunk)
        guard.add(len(chunk))
    return n


def media_type(resp) -> str:
    return (resp.headers.get("Content-Type") or "").split(";")[0].strip().lower()


def with_retries(action, what: str, retries: int, backoff: float):
    """action(), tried again after each TransientError, `retries` times, with exponential backoff."""
    for attempt in range(retries + 1):
        try:
            return action()
        except TransientError as e:
            if attempt == retries:
                n = retries + 1
                raise e.final(f"{what}: failed after {n} attempt{'s' if n > 1 else ''} ({e})") from None
            time.sleep(backoff * 2 ** attempt)


# ----------------------------------------------------------------------------------------------------
# Listing (GCS JSON API)
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RemoteObject:
    name: str
    size: int
    checksum: Checksum | None


def listing_url(base_url: str, bucket: str, prefix: str, page_token: str | None = None) -> str:
    query = {"prefix": prefix, **({"pageToken": page_token} if page_token else {})}
    return f"{base_url.rstrip('/')}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"


def object_url(base_url: str, bucket: str, name: str) -> str:
    return f"{base_url.rstrip('/')}/{bucket}/{urllib.parse.quote(name)}"


def fetch_json(url: str, net: Network) -> dict:
    """The JSON object at url; an HTML page (captive portal, proxy login) or other non-JSON is a ValueError."""
    def attempt():
        chunks = []
        try:
            with open_url(url, net.timeout) as resp:
                kind = media_type(resp)
                if kind and kind != "application/json" and not kind.endswith("+json"):
                    raise ValueError(f"{url}: expected a JSON listing, got {kind} (a captive portal or proxy?)")
                copy_body(resp, chunks.append, net.rate_guard(), MAX_LISTING_PAGE)
                if resp.length:  # http.client counts down Content-Length; what is left never came
                    raise TransientError(f"connection closed {resp.length} bytes before the end of the listing")
        except NETWORK_ERRORS as e:
            raise TransientError(network_problem(e, net.timeout)) from None
        try:
            page = json.loads(b"".join(chunks))
        except ValueError:
            raise ValueError(f"{url}: expected a JSON listing, got {sum(map(len, chunks))} bytes that are not "
                             f"JSON (a captive portal or proxy?)") from None
        if not isinstance(page, dict):
            raise ValueError(f"{url}: unexpected listing (a JSON {type(page).__name__}, not an object)")
        return page

    return with_retries(attempt, url, net.retries, net.backoff)


def listed_object(item, url: str) -> RemoteObject:
    try:
        name, size = item["name"], int(item["size"])
        if not isinstance(name, str) or size < 0:
            raise ValueError(f"bad name or size {item['name']!r}, {item['size']!r}")
        return RemoteObject(name, size, listed_checksum(item))
    except (KeyError, TypeError, ValueError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{url}: unexpected listing item ({what})") from None


def gcs_list(base_url: str, bucket: str, prefix: str, net: Network | None = None) -> list[RemoteObject]:
    """The objects whose names start with prefix, following nextPageToken; folder placeholders skipped."""
    net = net or Network()
    objects, token = [], None
    while True:
        url = listing_url(base_url, bucket, prefix, token)
        page = fetch_json(url, net)
        items = page.get("items", [])
        if not isinstance(items, list):
            raise ValueError(f"{url}: unexpected listing (items is not a list)")
        for obj in (listed_object(item, url) for item in items):
            if not obj.name.startswith(prefix):
                raise ValueError(f"{url}: listing for prefix {prefix!r} returned {obj.name!r}")
            if not obj.name.endswith("/"):
                objects.append(obj)
        token = page.get("nextPageToken")
        if not token:
            return objects


def is_safe_name(name: str) -> bool:
    """A relative path that stays inside the output folder on any OS and cannot collide with our .part files."""
    parts = name.split("/")
    return (bool(name) and not name.startswith("/") and "\\" not in name and "\0" not in name
            and ":" not in parts[0] and all(p not in ("", ".", "..") for p in parts) and not name.endswith(".part"))


def list_pg19(split: str, base_url: str, bucket: str, net: Network) -> list[RemoteObject]:
    """The split's books, then metadata.csv when the bucket has one; every name checked safe."""
    objects = gcs_list(base_url, bucket, f"{split}/", net)
    if not objects:
        raise OSError(f"{listing_url(base_url, bucket, split + '/')}: no files under {split}/")
    objects += [obj for obj in gcs_list(base_url, bucket, "metadata.csv", net) if obj.name == "metadata.csv"]
    for obj in objects:
        if not is_safe_name(obj.name):
            raise ValueError(f"{base_url.rstrip('/')}/{bucket}: refusing unsafe object name {obj.name!r}")
    return objects


def refuse_unverifiable(objects: list[RemoteObject], where: str) -> None:
    unchecked = [obj.name for obj in objects if obj.checksum is None]
    if unchecked:
        more = f" (and {len(unchecked) - 1} more)" if len(unchecked) > 1 else ""
        raise ValueError(f"{where}: the listing gives no md5Hash or crc32c for {unchecked[0]}{more}; refusing files "
                         f"that cannot be verified (--allow-unverified accepts them on their size alone)")


# ----------------------------------------------------------------------------------------------------
# Verified stamps
# ----------------------------------------------------------------------------------------------------

def file_identity(path: Path) -> list[int]:
    """What changes whenever a file's bytes do: size, mtime and ctime (a write sets ctime, and so does putting
    mtime back with utime)."""
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class Stamps:
    """OUT/.pg19-verified.json: object name -> [size, mtime_ns, ctime_ns, "md5 <hex>"] of each file verified.

    Only a time saver: a missing or unreadable sidecar means the files are hashed again. It is rewritten at
    most every few seconds (a train split has 28,602 files) and once at the end.
    """

    SAVE_EVERY_S = 5.0

    def __init__(self, path: Path):
        self.path, self.dirty, self.saved_at = path, False, time.monotonic()
        try:
            entries = json.loads(path.read_text())
            self.entries = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    def vouches_for(self, name: str, path: Path, checksum: Checksum) -> bool:
        try:
            return self.entries.get(name) == file_identity(path) + [str(checksum)]
        except OSError:
            return False

    def record(self, name: str, path: Path, checksum: Checksum) -> None:
        self.entries[name] = file_identity(path) + [str(checksum)]
        self.dirty = True

    def forget(self, name: str) -> None:
        self.dirty |= self.entries.pop(name, None) is not None

    def save(self, force: bool = False) -> None:
        if self.dirty and (force or time.monotonic() - self.saved_at >= self.SAVE_EVERY_S):
            atomic.write_json(self.path, self.entries, indent=None)
            self.dirty, self.saved_at = False, time.monotonic()


# ----------------------------------------------------------------------------------------------------
# Download of one object, verified
# ----------------------------------------------------------------------------------------------------

def part_path(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")


def size_of(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def body_start(resp, have: int, size: int) -> int:
    """Where the body starts in the object: `have` for a 206 of the range asked, 0 for a 200 (Range ignored).

    A response announcing a length or range other than the listing's is refused before a byte is written.
    """
    length = resp.headers.get("Content-Length")
    if resp.status == 206:
        content_range = resp.headers.get("Content-Range", "")
        if content_range != f"bytes {have}-{size - 1}/{size}":
            raise BadResponse(f"asked for bytes {have}- of {size}, got Content-Range {content_range!r}")
        start = have
    elif resp.status == 200:
        start = 0
    else:
        raise BadResponse(f"unexpected HTTP {resp.status}")
    if length is not None and length.isdigit() and int(length) != size - start:
        raise BadResponse(f"the server announces {length} bytes, the listing says {size - start}")
    return start


def download_file(url: str, dest: Path, size: int, checksum: Checksum | None, bar, net: Network) -> None:
    """Fetches url into `dest.part`, resuming with a Range request, and renames it to dest once its size and
    checksum match the listing. A mismatch deletes the .part and the next attempt starts from byte 0."""
    part = part_path(dest)
    sent_html = False  # for the message: a captive portal answers object requests with its login page

    def discard():
        bar.update(-min(size_of(part), size))
        part.unlink(missing_ok=True)

    def attempt():
        nonlocal sent_html
        have = size_of(part)
        if have > size:  # longer than the object, so not a prefix of it
            discard()
            have = 0
        hasher = hash_file(part, checksum) if have and checksum else new_hasher(checksum)
        if have < size:
            with open_url(url, net.timeout, {"Range": f"bytes={have}-"} if have else None) as resp:
                sent_html |= media_type(resp) == "text/html"
                start = body_start(resp, have, size)
                if start != have:
                    bar.update(start - have)
                    have, hasher = start, new_hasher(checksum)

                def sink(chunk):
                    f.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))

                with open(part, "ab" if have else "wb") as f:
                    have += copy_body(resp, sink, net.rate_guard(), size - have)
        if size == 0:
            part.touch()  # nothing to fetch, but the rename below needs the file
        if have < size:
            raise TransientError(f"connection closed after {have} of {size} bytes")
        if have > size:
            raise Mismatch(f"received more than the {size} bytes of the listing")
        if hasher.digest() != (checksum.digest if checksum else b""):
            raise Mismatch(f"{checksum.kind} mismatch: expected {checksum.digest.hex()}, got {hasher.digest().hex()}")

    def guarded_attempt():
        try:
            attempt()
        except RangeNotSatisfiable:
            discard()
            raise
        except Mismatch as e:
            discard()
            if sent_html:
                raise Mismatch(f"{e}; the server sent text/html: a captive portal or proxy?") from None
            raise
        except BadResponse as e:
            if sent_html:
                raise BadResponse(f"{e}; the server sent text/html: a captive portal or proxy?") from None
            raise
        except NETWORK_ERRORS as e:
            raise TransientError(network_problem(e, net.timeout)) from None
        except HttpError:
            raise
        except OSError as e:  # the disk: full, read-only, permissions
            raise OSError(f"{part}: {e.strerror or e}") from None

    with_retries(guarded_attempt, url, net.retries, net.backoff)
    try:
        part.replace(dest)
    except OSError as e:
        raise OSError(f"{dest}: cannot rename the verified .part into place ({e.strerror or e})") from None


# ----------------------------------------------------------------------------------------------------
# PG19
# ----------------------------------------------------------------------------------------------------

def stderr_log(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def existing_problem(path: Path, obj: RemoteObject, stamps: Stamps, bar) -> str | None:
    """Why the file under its final name is not the listed object, or None when it is."""
    got = path.stat().st_size
    if got != obj.size:
        return f"{got} bytes, the listing says {obj.size}"
    if obj.checksum is None or stamps.vouches_for(obj.name, path, obj.checksum):
        return None
    digest = hash_file(path, obj.checksum, bar=bar).digest()
    if digest != obj.checksum.digest:
        return f"{obj.checksum.kind} {digest.hex()}, the listing says {obj.checksum.digest.hex()}"
    stamps.record(obj.name, path, obj.checksum)
    return None


def files_to_fetch(objects: list[RemoteObject], out_dir: Path, stamps: Stamps, log, progress: bool) -> list:
    """The objects not yet present and verified; a present file that does not match is deleted."""
    present = [obj for obj in objects if (out_dir / obj.name).is_file()]
    unstamped = sum(obj.size for obj in present
                    if obj.checksum and not stamps.vouches_for(obj.name, out_dir / obj.name, obj.checksum))
    todo = {obj.name for obj in objects if not (out_dir / obj.name).is_file()}
    with tqdm(total=unstamped, unit="B", unit_scale=True, unit_divisor=1024, desc="verifying", leave=False,
              disable=not progress or not unstamped, dynamic_ncols=True) as bar:
        for obj in present:
            path = out_dir / obj.name
            problem = existing_problem(path, obj, stamps, bar)
            if problem is None:
                part_path(path).unlink(missing_ok=True)  # left over from an older run, no longer needed
                continue
            log(f"{path}: {problem} (stale or damaged): downloading it again")
            stamps.forget(obj.name)
            path.unlink()
            todo.add(obj.name)
    return [obj for obj in objects if obj.name in todo]  # the listing's order


def download_pg19(split: str, out_dir, base_url: str = DEFAULT_BASE_URL, bucket: str = DEFAULT_BUCKET,
                  timeout: float = 30.0, retries: int = 5, backoff: float = 1.0, progress: bool = True,
                  min_rate: float = 1024.0, rate_window: float = 30.0, allow_unverified: bool = False,
                  log=stderr_log) -> list[Path]:
    """Downloads PG19 `split` (+ metadata.csv) into out_dir in the PG19 layout, every file verified against
    the listing's checksum (see the module docstring); returns the paths of the split's files and metadata.csv.

    `log(message)` receives the one-line notes (a stale file downloaded again, an unverified file accepted).
    """
    if split not in PG19_SPLITS:
        raise ValueError(f"unknown PG19 split {split!r}; choose one of {', '.join(PG19_SPLITS)}")
    net = Network(timeout, retries, backoff, min_rate, rate_window)
    out_dir = Path(out_dir)
    objects = list_pg19(split, base_url, bucket, net)
    if not allow_unverified:
        refuse_unverifiable(objects, f"{base_url.rstrip('/')}/storage/v1/b/{bucket}/o")
    for obj in objects:
        if obj.checksum is None:
            log(f"warning: {out_dir / obj.name}: no checksum in the listing, accepted on its size alone")
    try:
        (out_dir / split).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"{out_dir / split}: cannot create the folder ({e.strerror or e})") from None
    stamps = Stamps(out_dir / STAMP_FILE)
    try:
        todo = files_to_fetch(objects, out_dir, stamps, log, progress)
        resumed = sum(min(size_of(part_path(out_dir / obj.name)), obj.size) for obj in todo)
        with tqdm(total=sum(obj.size for obj in todo), initial=resumed, unit="B", unit_scale=True,
                  unit_divisor=1024, desc=f"PG19 {split}", disable=not progress, dynamic_ncols=True) as bar:
            for obj in todo:
                dest = out_dir / obj.name
                download_file(object_url(base_url, bucket, obj.name), dest, obj.size, obj.checksum, bar, net)
                if obj.checksum:
                    stamps.record(obj.name, dest, obj.checksum)
                    stamps.save()
    except BaseException:
        with contextlib.suppress(OSError):  # the error being raised matters more than a lost stamp
            stamps.save(force=True)
        raise
    stamps.save(force=True)
    return [out_dir / obj.name for obj in objects]


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = cli.one_line_errors(argparse.ArgumentParser(prog="download.py", description=__doc__.split("\n")[0]))
    p.add_argument("dataset", help="pg19 (the only one)")
    p.add_argument("--split", default="validation", help="train | validation | test [validation]")
    p.add_argument("--out", default="data/pg19", help="output folder, PG19 layout [data/pg19]")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help=f"[{DEFAULT_BASE_URL}]")
    p.add_argument("--bucket", default=DEFAULT_BUCKET, help=f"[{DEFAULT_BUCKET}]")
    p.add_argument("--timeout", type=float, default=30.0, help="connect and per-read stall limit, seconds [30]")
    p.add_argument("--min-rate", type=float, default=1024.0,
                   help="cut a transfer slower than this many bytes/s over --rate-window (0: never) [1024]")
    p.add_argument("--rate-window", type=float, default=30.0, help="seconds the --min-rate is averaged over [30]")
    p.add_argument("--retries", type=int, default=5, help="further attempts per request, backoff 1, 2, 4... s [5]")
    p.add_argument("--allow-unverified", action="store_true",
                   help="accept objects the listing gives no checksum for, on their size alone (warned)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.dataset != "pg19":
        raise ValueError(f"unknown dataset {args.dataset!r}; only pg19 can be downloaded")
    files = download_pg19(args.split, args.out, base_url=args.base_url, bucket=args.bucket, timeout=args.timeout,
                          retries=args.retries, min_rate=args.min_rate, rate_window=args.rate_window,
                          allow_unverified=args.allow_unverified, progress=not args.no_progress)
    print(f"{len(files)} files in {Path(args.out) / args.split}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
