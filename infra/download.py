"""PG19 download from DeepMind's public `deepmind-gutenberg` bucket on Google Cloud Storage, every file verified.

One split (`train`, `validation`, `test`: 28,602 / 50 / 100 books) and `metadata.csv` into OUT/<split>/<id>.txt and
OUT/metadata.csv (PG19's layout, what infra/sources.py reads), listed with the GCS JSON API (paged by
`nextPageToken`) and fetched from `{base_url}/{bucket}/{name}`; the standard library and tqdm only.

A file is written to `<name>.part`, hashed as it arrives, and renamed to `<name>` only once its size and the
listing's `md5Hash` (else `crc32c`: composite objects have no MD5) match: a file under its final name was
verified, and files already present are verified again on every run. Cut connections, stalls (`timeout`), transfers
slower than `min_rate` over `rate_window`, HTTP 429 / 5xx and connection errors are retried `retries` times with
backoff, resuming with HTTP Range. Errors are one line naming the URL or file: ValueError for bad data (a listing
that is not JSON, e.g. a captive portal's page; an item without a checksum; unsafe object names: nothing is
written then), OSError for the network and the disk.

    python -m infra.download pg19 --split validation --out data/pg19    (--help: the server and network flags)
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import hashlib
import http.client
import json
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from infra import cli

PG19_SPLITS = ("train", "validation", "test")
DEFAULT_BASE_URL = "https://storage.googleapis.com"
DEFAULT_BUCKET = "deepmind-gutenberg"
CHUNK = 1 << 20
MAX_LISTING_PAGE = 256 << 20  # a page of 1,000 items is ~1 MB; anything far larger is not a GCS listing


# The reflected CRC32C register (Castagnoli polynomial 0x82F63B78) after shifting each byte value through it.
CRC32C_TABLE = [functools.reduce(lambda c, _: c >> 1 ^ (0x82F63B78 if c & 1 else 0), range(8), b) for b in range(256)]


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C of data, continuing from the CRC of the bytes before it: crc32c(b, crc32c(a)) == crc32c(a + b)."""
    table, crc = CRC32C_TABLE, crc ^ 0xFFFFFFFF
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


class RemoteObject(NamedTuple):
    name: str
    size: int
    kind: str | None       # the checksum: "md5" or "crc32c"; None when the listing gives neither
    digest: bytes | None   # raw: 16 bytes for md5, 4 for crc32c

    def hasher(self):
        return hashlib.md5() if self.kind == "md5" else Crc32c()


def hash_file(path: Path, hasher, bar=None):
    """A hashlib-style hasher fed with the bytes of path (counted on bar)."""
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            hasher.update(chunk)
            if bar is not None:
                bar.update(len(chunk))
    return hasher


def listed_checksum(item: dict) -> tuple[str | None, bytes | None]:
    """The checksum to verify an object with: its MD5 when the listing has one, else its CRC32C."""
    for field, kind, length in (("md5Hash", "md5", 16), ("crc32c", "crc32c", 4)):
        if (text := item.get(field)) is not None:
            with contextlib.suppress(TypeError, ValueError):  # binascii.Error is a ValueError
                if len(raw := base64.b64decode(text, validate=True)) == length:
                    return kind, raw
            raise ValueError(f"{field} is not the base64 of {length} bytes: {text!r}")
    return None, None


class TransientError(Exception):
    """A failure worth another attempt, raised as `final` (OSError or ValueError) once the attempts are used up.
    `discard`: the .part is not a prefix of the object, so the next attempt starts from byte 0."""

    def __init__(self, message: str, final: type = OSError, discard: bool = False):
        super().__init__(message)
        self.final, self.discard = final, discard


# What a flaky network raises while connecting or reading (HTTPError, a URLError, is sorted out in open_url);
# socket.timeout is TimeoutError, ssl.SSLError a TLS connection cut mid-record.
NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError, http.client.HTTPException, ssl.SSLError)


class Network(NamedTuple):
    timeout: float      # connect and per-read stall limit, seconds
    retries: int        # further attempts after the first
    backoff: float      # seconds before the first retry, doubled for each next one
    min_rate: float     # bytes/s over rate_window below which a transfer is cut (0: never)
    rate_window: float  # seconds


def open_url(url: str, timeout: float, headers: dict | None = None):
    """The response to GET url; HTTP 416, 429 and 5xx as TransientError, other error statuses as OSError."""
    # identity: hash the stored bytes, never a transcoding of them
    request = urllib.request.Request(url, headers={"Accept-Encoding": "identity", **(headers or {})})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 416:  # our .part does not fit the remote object
            raise TransientError("HTTP 416 range not satisfiable", discard=True) from None
        if e.code == 429 or e.code >= 500:
            raise TransientError(f"HTTP {e.code} {e.reason}") from None
        raise OSError(f"{url}: HTTP {e.code} {e.reason}") from None  # 404, 403...: another try will not help


def copy_body(resp, sink, limit: int, net: Network, clock=time.monotonic) -> int:
    """Feeds the body to sink(chunk) until EOF or just past `limit` bytes; returns the bytes read. A transfer
    bringing less than net.min_rate bytes/s over net.rate_window seconds is cut (the socket timeout catches a
    server that stops sending, this one that sends a byte now and then: read1 returns what has arrived)."""
    n, window_start, window_n = 0, clock(), 0
    while n <= limit and (chunk := resp.read1(min(CHUNK, limit - n + 1))):
        sink(chunk)
        n += len(chunk)
        if net.min_rate and (elapsed := clock() - window_start) >= net.rate_window:
            if (rate := (n - window_n) / elapsed) < net.min_rate:
                raise TransientError(f"too slow: {rate:.0f} B/s over the last {elapsed:.1f} s, "
                                     f"below the minimum rate of {net.min_rate:g} B/s")
            window_start, window_n = window_start + elapsed, n
    return n


def with_retries(action, what: str, net: Network):
    """action(), tried again after each TransientError or network error, net.retries times, with backoff."""
    for attempt in range(net.retries + 1):
        try:
            return action()
        except (TransientError, *NETWORK_ERRORS) as e:
            if not isinstance(e, TransientError):
                reason = e.reason if isinstance(e, urllib.error.URLError) else e
                problem = (f"no answer within the {net.timeout:g} s timeout" if isinstance(reason, TimeoutError)
                           else str(reason) or type(reason).__name__)
                e = TransientError(problem)
            if attempt == net.retries:
                raise e.final(f"{what}: failed after {attempt + 1} attempt{'s' * (attempt > 0)} ({e})") from None
            time.sleep(net.backoff * 2 ** attempt)


def listing_url(base_url: str, bucket: str, prefix: str, page_token: str | None = None) -> str:
    query = {"prefix": prefix, **({"pageToken": page_token} if page_token else {})}
    return f"{base_url.rstrip('/')}/storage/v1/b/{bucket}/o?{urllib.parse.urlencode(query)}"


def fetch_json(url: str, net: Network):
    """The JSON at url (one attempt); an HTML page (captive portal, proxy login) or other non-JSON is a ValueError."""
    chunks = []
    with open_url(url, net.timeout) as resp:
        kind = resp.headers.get_content_type()  # lower case, parameters dropped
        if resp.headers["Content-Type"] and kind != "application/json" and not kind.endswith("+json"):
            raise ValueError(f"{url}: expected a JSON listing, got {kind} (a captive portal or proxy?)")
        copy_body(resp, chunks.append, MAX_LISTING_PAGE, net)
        if resp.length:  # http.client counts down Content-Length; what is left never came
            raise TransientError(f"connection closed {resp.length} bytes before the end of the listing")
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise ValueError(f"{url}: expected a JSON listing, got {sum(map(len, chunks))} bytes that are not JSON "
                         f"(a captive portal or proxy?)") from None


def gcs_list(base_url: str, bucket: str, prefix: str, net: Network) -> list[RemoteObject]:
    """The objects whose names start with prefix, following nextPageToken; folder placeholders skipped."""
    objects, token, seen = [], None, set()
    while True:
        url = listing_url(base_url, bucket, prefix, token)
        page = with_retries(lambda: fetch_json(url, net), url, net)
        if not isinstance(items := page.get("items", []) if isinstance(page, dict) else None, list):
            raise ValueError(f"{url}: unexpected listing (not a JSON object with a list of items)")
        for item in items:
            try:
                obj = RemoteObject(item["name"], int(item["size"]), *listed_checksum(item))
                if not isinstance(obj.name, str) or obj.size < 0:
                    raise ValueError(f"bad name or size {item['name']!r}, {item['size']!r}")
            except (KeyError, TypeError, ValueError) as e:
                what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
                raise ValueError(f"{url}: unexpected listing item ({what})") from None
            if not obj.name.startswith(prefix):
                raise ValueError(f"{url}: listing for prefix {prefix!r} returned {obj.name!r}")
            objects.append(obj)
        if not (token := page.get("nextPageToken")):
            return [obj for obj in objects if not obj.name.endswith("/")]
        if token in seen:   # a server paging in a circle would be listed forever
            raise ValueError(f"{url}: the listing repeats the page token {token!r}; it would never end")
        seen.add(token)


def is_safe_name(name: str) -> bool:
    """A relative path that stays inside the output folder on any OS and cannot collide with our .part files."""
    parts = name.split("/")
    return (bool(name) and not name.startswith("/") and "\\" not in name and "\0" not in name
            and ":" not in parts[0] and all(p not in ("", ".", "..") for p in parts) and not name.endswith(".part"))


def list_pg19(split: str, base_url: str, bucket: str, net: Network) -> list[RemoteObject]:
    """The split's books, then metadata.csv when the bucket has one; refused unless all are safe and checksummed."""
    objects = gcs_list(base_url, bucket, f"{split}/", net)
    if not objects:
        raise OSError(f"{listing_url(base_url, bucket, split + '/')}: no files under {split}/")
    objects += [obj for obj in gcs_list(base_url, bucket, "metadata.csv", net) if obj.name == "metadata.csv"]
    for obj in objects:
        if not is_safe_name(obj.name):
            raise ValueError(f"{base_url.rstrip('/')}/{bucket}: refusing unsafe object name {obj.name!r}")
    if unchecked := [obj.name for obj in objects if obj.kind is None]:
        more = f" (and {len(unchecked) - 1} more)" if len(unchecked) > 1 else ""
        raise ValueError(f"{base_url.rstrip('/')}/storage/v1/b/{bucket}/o: the listing gives no md5Hash or crc32c "
                         f"for {unchecked[0]}{more}; refusing files that cannot be verified")
    return objects


def size_of(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def discard(part: Path, size: int, bar) -> None:
    bar.update(-min(size_of(part), size))  # the bar counts min(size_of(part), size) for the file in progress
    part.unlink(missing_ok=True)


def body_start(resp, have: int, size: int, hint: str) -> int:
    """Where the body starts in the object: `have` for a 206 of the range asked, 0 for a 200 (Range ignored).
    A response announcing a length or range other than the listing's is refused before a byte is written."""
    start = have if resp.status == 206 else 0
    length, content_range = resp.headers.get("Content-Length"), resp.headers.get("Content-Range", "")
    if resp.status == 206 and content_range != f"bytes {have}-{size - 1}/{size}":
        problem = f"asked for bytes {have}- of {size}, got Content-Range {content_range!r}"
    elif length is not None and length.isdigit() and int(length) != size - start:
        problem = f"the server announces {length} bytes, the listing says {size - start}"
    else:
        return start
    raise TransientError(problem + hint, ValueError)  # the .part is kept: it may well be a good prefix


def fetch_part(url: str, part: Path, obj: RemoteObject, bar, net: Network) -> None:
    """One attempt at completing `part` (resumed with Range); TransientError unless size and checksum match."""
    size, have = obj.size, size_of(part)
    if have > size:  # longer than the object, so not a prefix of it: dropped without spending an attempt
        discard(part, size, bar)
        have = 0
    hasher = hash_file(part, obj.hasher()) if have else obj.hasher()
    hint = ""  # a captive portal answers object requests with its login page
    if have < size:
        with open_url(url, net.timeout, {"Range": f"bytes={have}-"} if have else None) as resp:
            if resp.headers.get_content_type() == "text/html":
                hint = "; the server sent text/html: a captive portal or proxy?"
            if (start := body_start(resp, have, size, hint)) != have:  # Range ignored: the whole object
                bar.update(start - have)
                have, hasher = start, obj.hasher()
            with open(part, "ab" if have else "wb") as f:
                def sink(chunk):
                    f.write(chunk)
                    hasher.update(chunk)
                    bar.update(len(chunk))
                have += copy_body(resp, sink, size - have, net)
    if have < size:
        raise TransientError(f"connection closed after {have} of {size} bytes")
    if (got := hasher.digest()) != obj.digest:  # also where the body ran past the listing's size
        raise TransientError(f"{obj.kind} mismatch: expected {obj.digest.hex()}, got {got.hex()}{hint}",
                             ValueError, discard=True)


def download_file(url: str, dest: Path, obj: RemoteObject, bar, net: Network) -> None:
    """Fetches url into `dest.part` and renames it to dest once its size and checksum match the listing."""
    part = dest.with_name(dest.name + ".part")
    bar.update(min(size_of(part), obj.size))

    def attempt():
        try:
            fetch_part(url, part, obj, bar, net)
        except TransientError as e:
            if e.discard:
                discard(part, obj.size, bar)
            raise

    try:
        with_retries(attempt, url, net)
        part.touch()  # for an empty object: nothing was fetched, but the rename needs the file
        part.replace(dest)
    except OSError as e:
        if e.strerror is None:  # ours, naming the URL already; else the disk: full, read-only, permissions
            raise
        raise OSError(f"{part}: {e.strerror}") from None


def is_verified(path: Path, obj: RemoteObject, bar, log) -> bool:
    """Whether the file under its final name is the listed object; one that is not is deleted, with a log line."""
    if (got := path.stat().st_size) != obj.size:
        problem = f"{got} bytes, the listing says {obj.size}"
    elif (digest := hash_file(path, obj.hasher(), bar).digest()) != obj.digest:
        bar.update(-got)
        problem = f"{obj.kind} {digest.hex()}, the listing says {obj.digest.hex()}"
    else:
        return True
    log(f"{path}: {problem} (stale or damaged): downloading it again")
    path.unlink()
    return False


def download_pg19(split: str, out_dir, base_url: str = DEFAULT_BASE_URL, bucket: str = DEFAULT_BUCKET,
                  timeout: float = 30.0, retries: int = 5, backoff: float = 1.0, progress: bool = True,
                  min_rate: float = 1024.0, rate_window: float = 30.0, log=None) -> list[Path]:
    """PG19 `split` and metadata.csv into out_dir, each file verified (see the module docstring); returns their
    paths. `log(message)` receives the one-line notes (a stale file downloaded again); None: stderr."""
    if split not in PG19_SPLITS:
        raise ValueError(f"unknown PG19 split {split!r}; choose one of {', '.join(PG19_SPLITS)}")
    cli.check_range("--timeout", timeout, 0, open_low=True)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"--retries must be a non-negative integer, got {retries!r}")
    cli.check_range("--backoff", backoff, 0)
    cli.check_range("--min-rate", min_rate, 0)
    cli.check_range("--rate-window", rate_window, 0, open_low=True)
    net, out_dir = Network(timeout, retries, backoff, min_rate, rate_window), Path(out_dir)
    log = log or (lambda message: tqdm.write(message, file=sys.stderr))
    objects = list_pg19(split, base_url, bucket, net)
    (out_dir / split).mkdir(parents=True, exist_ok=True)
    # one bar for all bytes, verified (files present) or fetched
    with tqdm(total=sum(obj.size for obj in objects), desc=f"PG19 {split}", disable=not progress, unit="B",
              unit_scale=True, unit_divisor=1024, dynamic_ncols=True) as bar:
        for obj in objects:
            dest = out_dir / obj.name
            if dest.is_file() and is_verified(dest, obj, bar, log):
                dest.with_name(dest.name + ".part").unlink(missing_ok=True)  # left over from an older run
            else:
                url = f"{base_url.rstrip('/')}/{bucket}/{urllib.parse.quote(obj.name)}"
                download_file(url, dest, obj, bar, net)
    return [out_dir / obj.name for obj in objects]


def main(argv=None) -> None:
    p = cli.one_line_errors(argparse.ArgumentParser(prog="python -m infra.download", description=__doc__.split("\n")[0],
                                                    formatter_class=cli.DefaultsHelp))
    p.add_argument("dataset", help="pg19 (the only one)")
    p.add_argument("--split", default="validation", help="train | validation | test")
    p.add_argument("--out", dest="out_dir", default="data/pg19", help="output folder, PG19 layout")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="the storage server")
    p.add_argument("--bucket", default=DEFAULT_BUCKET, help="the bucket holding PG19")
    p.add_argument("--timeout", type=float, default=30.0, help="connect and per-read stall limit, seconds")
    p.add_argument("--min-rate", type=float, default=1024.0, help="cut slower transfers, B/s (0: never)")
    p.add_argument("--rate-window", type=float, default=30.0, help="seconds the --min-rate is averaged over")
    p.add_argument("--retries", type=int, default=5, help="further attempts per request, backoff 1, 2, 4... s")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = vars(p.parse_args(argv))
    dataset, progress = args.pop("dataset"), not args.pop("no_progress")
    if dataset != "pg19":
        raise ValueError(f"unknown dataset {dataset!r}; only pg19 can be downloaded")
    files = download_pg19(**args, progress=progress)
    print(f"{len(files)} files in {Path(args['out_dir']) / args['split']}")


if __name__ == "__main__":
    sys.exit(cli.run(main))
