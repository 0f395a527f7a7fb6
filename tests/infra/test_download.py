"""download.py against a local stand-in for Google Cloud Storage (JSON listing API with md5Hash / crc32c, object
GETs with Range) that can misbehave in every way the downloader must survive. 127.0.0.1 only."""
import base64
import hashlib
import http.server
import json
import os
import socket
import threading
import time
import urllib.parse

import pytest

from infra import cli
from infra import download

BUCKET = "deepmind-gutenberg"
PORTAL = b"<html><head><title>Hotel WiFi</title></head><body>Please log in to continue.</body></html>"


def book(i, size):
    text = "".join(f"Book {i}, line {k}: it was a dark and stormy night.\n" for k in range(size // 40 + 1))
    return text.encode()[:size]


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def same_size_garbage(content: bytes) -> bytes:
    return bytes((b + 1) % 256 for b in content)


class FakeBucket:
    """Objects of one bucket; knobs to misbehave; a log of (path, Range header) for every request."""

    def __init__(self, files, page_size=2):
        self.files = dict(files)  # the truth: the listing's sizes and checksums are computed from it
        self.page_size = page_size
        self.checksums = {"md5Hash", "crc32c"}  # which fields the listing items carry
        self.extra_items = []                  # raw items appended to every listing page 0
        self.listing_body = None               # (content type, body) served instead of the listing
        self.page_token_loop = False           # every page points back to the first (for 50 pages, then 404)
        self.cut_once = set()  # names whose next GET stops half-way and closes the connection
        self.cut_always = set()
        self.ignore_range = False
        self.range_off_by = 0  # a 206 that starts this many bytes before the asked start, without Content-Length
        self.wrong = {}        # name -> [body, times left (None: always), content type], served with 200
        self.statuses = {}     # name -> HTTP statuses answered before the real object
        self.stall = set()     # names whose GET is never answered
        self.trickle = {}      # name -> times left (None: always): 100 bytes, then 10 bytes per 50 ms
        self.log = []
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def object_requests(self, name=None):
        return [(path, rng) for path, rng in self.log if not path.startswith("/storage/")
                and (name is None or path == f"/{BUCKET}/{name}")]

    def ranges(self, name):
        return [rng for _, rng in self.object_requests(name)]

    def item(self, name):
        content = self.files[name]
        item = {"kind": "storage#object", "name": name, "bucket": BUCKET, "size": str(len(content)),
                "md5Hash": b64(hashlib.md5(content).digest()),
                "crc32c": b64(download.crc32c(content).to_bytes(4, "big"))}
        return {k: v for k, v in item.items() if k not in {"md5Hash", "crc32c"} - self.checksums}

    def take(self, table, name):
        """The knob's value for this request, counting down its uses."""
        with self.lock:
            if name not in table:
                return None
            entry = table[name]
            times = entry[1] if isinstance(entry, list) else entry
            if times is not None:
                if times <= 1:
                    del table[name]
                elif isinstance(entry, list):
                    entry[1] -= 1
                else:
                    table[name] = times - 1
            return entry if isinstance(entry, list) else True


def make_handler(bucket: FakeBucket):
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def send(self, status, body, headers=()):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            with bucket.lock:
                bucket.log.append((url.path, self.headers.get("Range")))
            try:
                if url.path == f"/storage/v1/b/{BUCKET}/o":
                    return self.listing(urllib.parse.parse_qs(url.query))
                if url.path.startswith(f"/{BUCKET}/"):
                    return self.object(urllib.parse.unquote(url.path[len(BUCKET) + 2:]))
                self.send(404, b"no such bucket")
            except (BrokenPipeError, ConnectionResetError):  # the client hung up, as it should on a trickle
                pass

        def listing(self, query):
            if bucket.listing_body:
                content_type, body = bucket.listing_body
                return self.send(200, body, [("Content-Type", content_type)])
            prefix = query["prefix"][0]
            if bucket.page_token_loop and len(bucket.log) > 50:
                return self.send(404, b"the test server gave up")
            start = int(query.get("pageToken", ["0"])[0])
            names = sorted(n for n in bucket.files if n.startswith(prefix))
            page = names[start:start + bucket.page_size]
            body = {"kind": "storage#objects", "items": [bucket.item(n) for n in page]}
            if start == 0:
                body["items"] += [it for it in bucket.extra_items if it["name"].startswith(prefix)]
            if start + bucket.page_size < len(names):
                body["nextPageToken"] = str(start + bucket.page_size)
            if bucket.page_token_loop:
                body["nextPageToken"] = "2" if start == 0 else "0"
            self.send(200, json.dumps(body).encode(), [("Content-Type", "application/json; charset=UTF-8")])

        def object(self, name):
            if name in bucket.stall:
                bucket.stop.wait(10)
                return
            with bucket.lock:
                status = bucket.statuses.get(name, []).pop(0) if bucket.statuses.get(name) else None
            if status:
                return self.send(status, b"try again later")
            if name not in bucket.files:
                return self.send(404, b"not found")
            wrong = bucket.take(bucket.wrong, name)
            if wrong:
                return self.send(200, wrong[0], [("Content-Type", wrong[2])])
            content = bucket.files[name]
            start = 0
            rng = self.headers.get("Range")
            if rng and not bucket.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(content):
                    return self.send(416, b"")
            start = max(0, start - bucket.range_off_by) if start else 0
            body = content[start:]
            status = 206 if start else 200
            self.send_response(status)
            if not bucket.range_off_by:
                self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.end_headers()
            if bucket.take(bucket.trickle, name):
                self.wfile.write(body[:100])
                for i in range(100, len(body), 10):
                    self.wfile.flush()
                    if bucket.stop.wait(0.05):
                        return
                    self.wfile.write(body[i:i + 10])
                return
            with bucket.lock:
                cut = name in bucket.cut_always or name in bucket.cut_once
                bucket.cut_once.discard(name)
            if cut:  # promise the whole body, send half, hang up (HTTP/1.0: the connection closes)
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


@pytest.fixture
def gcs():
    files = {f"validation/{i}.txt": book(i, 1000 + 517 * i) for i in range(5)}
    files["validation/"] = b""  # a folder placeholder object, as GCS listings can contain
    files["test/99.txt"] = book(99, 300)
    files["metadata.csv"] = b"id,split,title\n0,validation,Zero\n"
    bucket = FakeBucket(files)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(bucket))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    bucket.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield bucket
    finally:
        bucket.stop.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def silent_url():
    """A server that accepts connections (the kernel does, from the backlog) and never says a word."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def fetch(gcs, out, **kw):
    kw = {"timeout": 5, "retries": 3, "backoff": 0.01, "progress": False, **kw}
    return download.download_pg19("validation", out, base_url=gcs.url, **kw)


def expected_files(gcs):
    return {name: content for name, content in gcs.files.items()
            if name.startswith("validation/") and not name.endswith("/") or name == "metadata.csv"}


def assert_complete(gcs, out):
    for name, content in expected_files(gcs).items():
        assert (out / name).read_bytes() == content, name
    assert not (out / "test").exists()
    assert list(out.rglob("*.part")) == []


def on_disk(out):
    """Every file under out with its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


# ----------------------------------------------------------------------------------------------------
# CRC32C
# ----------------------------------------------------------------------------------------------------

def test_crc32c_known_vectors():
    assert download.crc32c(b"123456789") == 0xE3069283  # the CRC catalogue's check value
    assert download.crc32c(b"") == 0
    # RFC 3720 (iSCSI) appendix B.4
    assert download.crc32c(bytes(32)) == 0x8A9136AA
    assert download.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert download.crc32c(bytes(range(32))) == 0x46DD794E
    assert download.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    data = book(7, 5000)
    assert download.crc32c(data[1234:], download.crc32c(data[:1234])) == download.crc32c(data)
    h = download.Crc32c()
    for i in range(0, len(data), 333):
        h.update(data[i:i + 333])
    assert h.digest() == download.crc32c(data).to_bytes(4, "big")
    assert download.Crc32c(b"123456789").digest() == bytes.fromhex("e3069283")


def test_crc32c_only_objects(gcs, tmp_path):
    out = tmp_path / "pg19"
    gcs.checksums = {"crc32c"}  # composite objects: no md5Hash
    name = "validation/2.txt"
    good = gcs.files[name]
    gcs.wrong[name] = [same_size_garbage(good), 1, "text/plain"]
    fetch(gcs, out)
    assert_complete(gcs, out)
    assert gcs.ranges(name) == [None, None], "the corrupted copy was caught by its CRC32C and fetched again"

    (out / name).unlink()
    gcs.wrong[name] = [same_size_garbage(good), None, "text/plain"]
    with pytest.raises(ValueError) as e:
        fetch(gcs, out, retries=1)
    assert str(e.value) == (f"{gcs.url}/{BUCKET}/{name}: failed after 2 attempts (crc32c mismatch: expected "
                            f"{download.crc32c(good):08x}, got {download.crc32c(same_size_garbage(good)):08x})")
    assert not (out / name).exists() and not (out / (name + ".part")).exists()


# ----------------------------------------------------------------------------------------------------
# What worked before: paging, resume, Range ignored, 416, retries, errors
# ----------------------------------------------------------------------------------------------------

def test_download_split_with_paging_and_metadata(gcs, tmp_path):
    out = tmp_path / "pg19"
    paths = fetch(gcs, out)
    assert sorted(p.relative_to(out).as_posix() for p in paths) == sorted(
        [f"validation/{i}.txt" for i in range(5)] + ["metadata.csv"])
    assert_complete(gcs, out)
    assert sorted(on_disk(out)) == sorted(expected_files(gcs)), "the PG19 layout, nothing else"
    listings = [p for p, _ in gcs.log if p.startswith("/storage/")]
    assert len(listings) == 3 + 1  # 6 objects under validation/ in pages of 2, then metadata.csv
    assert len(gcs.object_requests()) == 6

    gcs.log.clear()
    fetch(gcs, out)
    assert gcs.object_requests() == [], "complete files, verified by their md5, are skipped"


def test_empty_object(gcs, tmp_path):
    out = tmp_path / "pg19"
    gcs.files["validation/5.txt"] = b""
    fetch(gcs, out)
    assert_complete(gcs, out)
    assert (out / "validation" / "5.txt").read_bytes() == b""


def test_download_resumes_cut_transfer(gcs, tmp_path):
    out = tmp_path / "pg19"
    gcs.cut_once = {"validation/4.txt", "validation/2.txt"}
    fetch(gcs, out)
    assert_complete(gcs, out)
    size4 = len(gcs.files["validation/4.txt"])
    assert gcs.ranges("validation/4.txt") == [None, f"bytes={size4 // 2}-"]


def test_download_resumes_existing_part(gcs, tmp_path):
    out = tmp_path / "pg19"
    content = gcs.files["validation/3.txt"]
    (out / "validation").mkdir(parents=True)
    (out / "validation" / "3.txt.part").write_bytes(content[:700])
    (out / "validation" / "1.txt").write_bytes(gcs.files["validation/1.txt"])  # already complete
    (out / "validation" / "1.txt.part").write_bytes(b"left over")  # from an older run: cleaned up
    fetch(gcs, out)
    assert_complete(gcs, out)
    assert gcs.ranges("validation/3.txt") == ["bytes=700-"]
    assert gcs.ranges("validation/1.txt") == [], "verified by its md5, not fetched again"


def test_server_ignoring_range_restarts_from_zero(gcs, tmp_path):
    out = tmp_path / "pg19"
    (out / "validation").mkdir(parents=True)
    (out / "validation" / "0.txt.part").write_bytes(b"X" * 100)  # would corrupt the file if appended to
    gcs.ignore_range = True
    fetch(gcs, out)
    assert_complete(gcs, out)
    assert gcs.ranges("validation/0.txt") == ["bytes=100-"]


def test_part_longer_than_the_object_restarts_from_zero(gcs, tmp_path):
    out = tmp_path / "pg19"
    name = "validation/1.txt"
    (out / "validation").mkdir(parents=True)
    (out / (name + ".part")).write_bytes(gcs.files[name] + b"trailing junk")
    fetch(gcs, out, retries=0)  # not a prefix of the object: dropped without spending an attempt
    assert_complete(gcs, out)
    assert gcs.ranges(name) == [None]


def test_206_of_another_range_is_refused(gcs, tmp_path):
    out = tmp_path / "pg19"
    name = "validation/3.txt"
    (out / "validation").mkdir(parents=True)
    (out / (name + ".part")).write_bytes(gcs.files[name][:700])
    gcs.range_off_by = 10
    size = len(gcs.files[name])
    with pytest.raises(ValueError, match=rf"{name}: failed after 1 attempt \(asked for bytes 700- of {size}, got "
                                         rf"Content-Range 'bytes 690-{size - 1}/{size}'\)$"):
        fetch(gcs, out, retries=0)
    assert (out / (name + ".part")).read_bytes() == gcs.files[name][:700], "the good prefix is not spliced onto"


def test_416_restarts_from_zero(gcs, tmp_path):
    out = tmp_path / "pg19"
    name = "validation/1.txt"
    (out / "validation").mkdir(parents=True)
    (out / (name + ".part")).write_bytes(gcs.files[name][:600])
    gcs.statuses[name] = [416]
    fetch(gcs, out)
    assert_complete(gcs, out)
    assert gcs.ranges(name) == ["bytes=600-", None]


def test_transient_statuses_are_retried_others_are_not(gcs, tmp_path):
    out = tmp_path / "pg19"
    gcs.statuses["validation/2.txt"] = [503, 429, 500]
    fetch(gcs, out)
    assert_complete(gcs, out)
    assert len(gcs.ranges("validation/2.txt")) == 4

    (out / "validation" / "3.txt").unlink()
    gcs.statuses["validation/3.txt"] = [403]
    gcs.log.clear()
    with pytest.raises(OSError, match=rf"^{gcs.url}/{BUCKET}/validation/3.txt: HTTP 403 Forbidden$"):
        fetch(gcs, out)
    assert len(gcs.ranges("validation/3.txt")) == 1, "a 403 is not retried"


def test_download_errors(gcs, tmp_path):
    out = tmp_path / "pg19"
    with pytest.raises(ValueError, match="unknown PG19 split 'dev'"):
        download.download_pg19("dev", out, base_url=gcs.url)
    with pytest.raises(OSError, match=r"/storage/v1/b/no-such-bucket/o\?prefix=validation%2F: HTTP 404"):
        download.download_pg19("validation", out, base_url=gcs.url, bucket="no-such-bucket", progress=False)
    with pytest.raises(ValueError, match="--timeout must be in"):
        fetch(gcs, out, timeout=0)
    with pytest.raises(ValueError, match="--retries must be a non-negative integer"):
        fetch(gcs, out, retries=-1)
    assert not out.exists(), "nothing written before the listing is known good"
    gcs.cut_always = {"validation/2.txt"}
    with pytest.raises(OSError, match=r"validation/2.txt: failed after 3 attempts \(connection closed after"):
        fetch(gcs, out, retries=2)
    assert not (out / "validation" / "2.txt").exists()
    assert (out / "validation" / "2.txt.part").is_file(), "kept for the next run to resume"
    gcs.cut_always = set()
    fetch(gcs, out)
    assert_complete(gcs, out)


def test_unreachable_server_fails_after_retries(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError, match="failed after 2 attempts"):
        download.download_pg19("validation", tmp_path, base_url=f"http://127.0.0.1:{port}", timeout=2, retries=1,
                               backoff=0.01, progress=False)


def test_unsafe_object_names_are_refused(gcs, tmp_path):
    out = tmp_path / "pg19"
    for bad in ["validation/../../evil.txt", "validation/a\\..\\..\\evil.txt", "validation/0.txt.part"]:
        gcs.extra_items = [{"name": bad, "size": "3", "md5Hash": b64(hashlib.md5(b"bad").digest())}]
        with pytest.raises(ValueError, match=f"refusing unsafe object name {bad!r}".replace("\\", "\\\\")):
            fetch(gcs, out)
    assert not out.exists() and not (tmp_path / "evil.txt").exists()


def test_malformed_listing_items_are_refused(gcs, tmp_path):
    out = tmp_path / "pg19"
    gcs.extra_items = [{"name": "validation/x.txt", "size": "3", "md5Hash": "not base64!"}]
    with pytest.raises(ValueError, match=r"prefix=validation%2F: unexpected listing item \(md5Hash is not the base64"):
        fetch(gcs, out)
    gcs.extra_items = [{"name": "validation/x.txt", "md5Hash": b64(bytes(16))}]
    with pytest.raises(ValueError, match=r"unexpected listing item \(missing field 'size'\)"):
        fetch(gcs, out)
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------
# Verification: wrong content, stale files, spliced .part, captive portals, no checksums
# ----------------------------------------------------------------------------------------------------

def test_same_size_wrong_content_is_downloaded_again(gcs, tmp_path):
    out = tmp_path / "pg19"
    name = "validation/2.txt"
    gcs.wrong[name] = [same_size_garbage(gcs.files[name]), 1, "text/plain"]  # one corrupted transfer
    fetch(gcs, out)
    assert_complete(gcs, out)
    assert gcs.ranges(name) == [None, None], "the second attempt starts again from byte 0"


def test_checksum_mismatch_after_retries(gcs, tmp_path):
    out = tmp_path / "pg19"
    fetch(gcs, out)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*.txt") if p.name != "2.txt"}
    name = "validation/2.txt"
    (out / name).unlink()
    good, bad = gcs.files[name], same_size_garbage(gcs.files[name])
    gcs.wrong[name] = [bad, None, "text/plain"]
    with pytest.raises(ValueError) as e:
        fetch(gcs, out, retries=2)
    assert str(e.value) == (f"{gcs.url}/{BUCKET}/{name}: failed after 3 attempts "
                            f"(md5 mismatch: expected {md5_hex(good)}, got {md5_hex(bad)})")
    assert not (out / name).exists(), "nothing under the final name"
    assert not (out / (name + ".part")).exists(), "a wrong .part is not kept for a resume"
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*.txt")} == before, \
        "the complete good files are untouched"


def test_present_file_with_same_size_wrong_content_is_replaced(gcs, tmp_path):
    out = tmp_path / "pg19"
    name = "validation/1.txt"
    good = gcs.files[name]
    (out / "validation").mkdir(parents=True)
    (out / name).write_bytes(same_size_garbage(good))
    log = []
    fetch(gcs, out, log=log.append)
    assert_complete(gcs, out)
    assert log == [f"{out / name}: md5 {md5_hex(same_size_garbage(good))}, the listing says {md5_hex(good)} "
                   f"(stale or damaged): downloading it again"]


def test_stale_file_after_the_object_changed(gcs, tmp_path):
    out = tmp_path / "pg19"
    fetch(gcs, out)
    gcs.files["validation/3.txt"] = book(33, len(gcs.files["validation/3.txt"]))  # a new edition, same size
    gcs.files["validation/4.txt"] = book(44, 777)  # and one of another size
    gcs.log.clear()
    log = []
    fetch(gcs, out, log=log.append)
    assert_complete(gcs, out)
    assert [p for p, _ in gcs.object_requests()] == [f"/{BUCKET}/validation/3.txt", f"/{BUCKET}/validation/4.txt"]
    assert len(log) == 2
    assert log[0].startswith(f"{out / 'validation/3.txt'}: md5 ") and log[0].endswith("downloading it again")
    assert log[1] == f"{out / 'validation/4.txt'}: {517 * 4 + 1000} bytes, the listing says 777 (stale or damaged): " \
                     f"downloading it again"


def test_file_modified_in_place_is_caught_by_its_checksum(gcs, tmp_path):
    out = tmp_path / "pg19"
    fetch(gcs, out)
    path = out / "validation" / "1.txt"
    st = path.stat()
    path.write_bytes(same_size_garbage(path.read_bytes()))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the content tells
    gcs.log.clear()
    log = []
    fetch(gcs, out, log=log.append)
    assert_complete(gcs, out)
    assert [p for p, _ in gcs.object_requests()] == [f"/{BUCKET}/validation/1.txt"]
    assert len(log) == 1 and log[0].startswith(f"{path}: md5 ") and log[0].endswith("downloading it again")


def test_spliced_part_from_another_source(gcs, tmp_path):
    out = tmp_path / "pg19"
    name = "validation/3.txt"
    (out / "validation").mkdir(parents=True)
    (out / (name + ".part")).write_bytes(book(77, 700))  # same length prefix, another book
    fetch(gcs, out)
    assert_complete(gcs, out)
    assert gcs.ranges(name) == ["bytes=700-", None], "resumed, caught by the md5, restarted from 0"

    (out / name).unlink()
    (out / (name + ".part")).write_bytes(book(77, 700))
    with pytest.raises(ValueError, match=rf"{name}: failed after 1 attempt \(md5 mismatch: expected "
                                         rf"{md5_hex(gcs.files[name])}, got [0-9a-f]{{32}}\)$"):
        fetch(gcs, out, retries=0)
    assert not (out / name).exists() and not (out / (name + ".part")).exists()


@pytest.mark.parametrize("content_type, body, problem", [
    ("text/html; charset=utf-8", PORTAL, "got text/html (a captive portal or proxy?)"),
    ("application/json", PORTAL, f"got {len(PORTAL)} bytes that are not JSON (a captive portal or proxy?)"),
])
def test_captive_portal_instead_of_the_listing(gcs, tmp_path, content_type, body, problem):
    out = tmp_path / "pg19"
    gcs.listing_body = (content_type, body)
    with pytest.raises(ValueError) as e:
        fetch(gcs, out)
    assert str(e.value) == f"{gcs.url}/storage/v1/b/{BUCKET}/o?prefix=validation%2F: expected a JSON listing, {problem}"
    assert not out.exists()


def test_captive_portal_instead_of_a_book(gcs, tmp_path):
    out = tmp_path / "pg19"
    name = "validation/1.txt"
    url = f"{gcs.url}/{BUCKET}/{name}"
    size = len(gcs.files[name])
    gcs.wrong[name] = [PORTAL, None, "text/html"]
    with pytest.raises(ValueError) as e:
        fetch(gcs, out, retries=1)
    assert str(e.value) == (f"{url}: failed after 2 attempts (the server announces {len(PORTAL)} bytes, the listing "
                            f"says {size}; the server sent text/html: a captive portal or proxy?)")
    assert not (out / name).exists() and not (out / (name + ".part")).exists()

    portal_padded = PORTAL + b" " * (size - len(PORTAL))  # the same length as the book: only the md5 tells
    gcs.wrong[name] = [portal_padded, None, "text/html"]
    with pytest.raises(ValueError) as e:
        fetch(gcs, out, retries=0)
    assert str(e.value) == (f"{url}: failed after 1 attempt (md5 mismatch: expected {md5_hex(gcs.files[name])}, "
                            f"got {md5_hex(portal_padded)}; the server sent text/html: a captive portal or proxy?)")
    assert not (out / name).exists() and not (out / (name + ".part")).exists()


def test_listing_without_checksums(gcs, tmp_path):
    out = tmp_path / "pg19"
    gcs.checksums = set()
    with pytest.raises(ValueError) as e:
        fetch(gcs, out)
    assert str(e.value) == (f"{gcs.url}/storage/v1/b/{BUCKET}/o: the listing gives no md5Hash or crc32c for "
                            f"validation/0.txt (and 5 more); refusing files that cannot be verified")
    assert not out.exists(), "refused before anything is downloaded"


# ----------------------------------------------------------------------------------------------------
# Timeouts and the minimum rate
# ----------------------------------------------------------------------------------------------------

def test_listing_server_that_never_answers(silent_url, tmp_path):
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        download.download_pg19("validation", tmp_path / "pg19", base_url=silent_url, timeout=0.5, retries=1,
                               backoff=0.01, progress=False)
    assert time.monotonic() - t0 < 3
    assert str(e.value) == (f"{silent_url}/storage/v1/b/{BUCKET}/o?prefix=validation%2F: failed after 2 attempts "
                            f"(no answer within the 0.5 s timeout)")


def test_object_server_that_never_answers(gcs, tmp_path):
    out = tmp_path / "pg19"
    gcs.stall = {"validation/3.txt"}
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        fetch(gcs, out, timeout=0.5, retries=1)
    assert time.monotonic() - t0 < 3
    assert str(e.value) == f"{gcs.url}/{BUCKET}/validation/3.txt: failed after 2 attempts (no answer within the 0.5 s timeout)"
    assert not (out / "validation" / "3.txt").exists()
    assert (out / "validation" / "2.txt").read_bytes() == gcs.files["validation/2.txt"]


def test_trickling_server_is_cut_by_min_rate(gcs, tmp_path):
    out = tmp_path / "pg19"
    name = "validation/4.txt"
    gcs.trickle[name] = 1  # ~200 B/s: never silent for 2 s, so only the rate rule can cut it
    fetch(gcs, out, timeout=2, min_rate=1000, rate_window=0.3)
    assert_complete(gcs, out)
    first, resumed = gcs.ranges(name)
    assert first is None and resumed.startswith("bytes=") and int(resumed[6:-1]) >= 100, "resumed after the cut"

    (out / name).unlink()
    gcs.trickle[name] = None
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        fetch(gcs, out, timeout=2, retries=1, min_rate=1000, rate_window=0.3)
    assert time.monotonic() - t0 < 3
    assert str(e.value).startswith(f"{gcs.url}/{BUCKET}/{name}: failed after 2 attempts (too slow: ")
    rate = int(str(e.value).split("too slow: ")[1].split(" B/s")[0])
    assert 100 < rate < 1000 and str(e.value).endswith("below the minimum rate of 1000 B/s)")
    assert not (out / name).exists() and (out / (name + ".part")).is_file(), "the good prefix is kept to resume"


def test_min_rate_rule():
    now = [0.0]

    class Response:
        """`step` bytes every 0.5 s of the fake clock, `total` bytes in all."""
        def __init__(self, step, total):
            self.step, self.left = step, total

        def read1(self, n):
            now[0] += 0.5
            chunk = b"x" * min(self.step, self.left, n)
            self.left -= len(chunk)
            return chunk

    net = download.Network(timeout=1, retries=0, backoff=0, min_rate=100, rate_window=10)
    with pytest.raises(download.TransientError, match=r"^too slow: 50 B/s over the last 10\.0 s, below the minimum "
                                                      r"rate of 100 B/s$"):
        download.copy_body(Response(25, 10_000), lambda chunk: None, 10_000, net, clock=lambda: now[0])
    got = []
    assert download.copy_body(Response(60, 6000), got.append, 6000, net, clock=lambda: now[0]) == 6000, \
        "120 B/s: never cut"
    assert download.copy_body(Response(1, 100), got.append, 100, net._replace(min_rate=0), clock=lambda: now[0]) == 100
    assert download.copy_body(Response(60, 6000), got.append, 100, net, clock=lambda: now[0]) == 101, \
        "reads stop just past the limit"


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def test_cli(gcs, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pg19"
    base = ["pg19", "--out", str(out), "--base-url", gcs.url, "--no-progress"]
    assert cli.run(download.main, base + ["--split", "validation", "--timeout", "5"]) == 0
    assert_complete(gcs, out)
    assert capsys.readouterr().out == f"6 files in {out / 'validation'}\n"

    assert cli.run(download.main, base + ["--split", "dev"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: unknown PG19 split 'dev'; choose one of train, validation, test"]
    assert cli.run(download.main, ["wikitext", "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: unknown dataset 'wikitext'; only pg19 can be downloaded"]
    assert cli.run(download.main, base + ["--min-rate", "-1"]) == 2
    assert capsys.readouterr().err.splitlines() == ["error: --min-rate must be in [0, inf), got -1.0"]
    with pytest.raises(SystemExit) as e:
        cli.run(download.main, base + ["--timeout", "soon"])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines() == ["error: argument --timeout: invalid float value: 'soon'"]

    monkeypatch.setattr(download, "download_pg19", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.run(download.main, base) == 130


def test_cli_unreachable_server(silent_url, tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        refused = f"http://127.0.0.1:{s.getsockname()[1]}"
    for url in (refused, silent_url):
        t0 = time.monotonic()
        assert cli.run(download.main, ["pg19", "--out", str(tmp_path), "--base-url", url, "--retries", "0",
                              "--timeout", "0.5", "--no-progress"]) == 2
        assert time.monotonic() - t0 < 3
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(
            f"error: {url}/storage/v1/b/{BUCKET}/o?prefix=validation%2F: failed after 1 attempt (")
    assert list(tmp_path.iterdir()) == []


def test_listing_whose_page_token_repeats_forever_stops(gcs, tmp_path):
    gcs.page_token_loop = True
    with pytest.raises(ValueError, match="repeats the page token '2'"):
        fetch(gcs, tmp_path / "out")
    assert len(gcs.log) == 3 and not (tmp_path / "out").exists()
