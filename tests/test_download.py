"""download_pg19 against a local stand-in for Google Cloud Storage (JSON listing API + object GETs with Range)."""
import http.server
import json
import threading
import urllib.parse

import pytest

import data

BUCKET = "deepmind-gutenberg"


def book(i, size):
    text = "".join(f"Book {i}, line {k}: it was a dark and stormy night.\n" for k in range(size // 40 + 1))
    return text.encode()[:size]


class FakeBucket:
    """Objects of one bucket; knobs to misbehave; a log of (path, Range header) for every request."""

    def __init__(self, files, page_size=2):
        self.files = dict(files)
        self.page_size = page_size
        self.cut_once = set()  # names whose next GET stops half-way and closes the connection
        self.cut_always = set()
        self.ignore_range = False
        self.log = []
        self.lock = threading.Lock()

    def object_requests(self):
        return [(path, rng) for path, rng in self.log if not path.startswith("/storage/")]


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
            if url.path == f"/storage/v1/b/{BUCKET}/o":
                return self.listing(urllib.parse.parse_qs(url.query))
            if url.path.startswith(f"/{BUCKET}/"):
                return self.object(urllib.parse.unquote(url.path[len(BUCKET) + 2:]))
            self.send(404, b"no such bucket")

        def listing(self, query):
            prefix = query["prefix"][0]
            start = int(query.get("pageToken", ["0"])[0])
            names = sorted(n for n in bucket.files if n.startswith(prefix))
            page = names[start:start + bucket.page_size]
            body = {"kind": "storage#objects",
                    "items": [{"name": n, "size": str(len(bucket.files[n]))} for n in page]}
            if start + bucket.page_size < len(names):
                body["nextPageToken"] = str(start + bucket.page_size)
            self.send(200, json.dumps(body).encode(), [("Content-Type", "application/json")])

        def object(self, name):
            if name not in bucket.files:
                return self.send(404, b"not found")
            content = bucket.files[name]
            start = 0
            rng = self.headers.get("Range")
            if rng and not bucket.ignore_range:
                start = int(rng.removeprefix("bytes=").split("-")[0])
                if start >= len(content):
                    return self.send(416, b"")
            body = content[start:]
            status = 206 if start else 200
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(content) - 1}/{len(content)}")
            self.end_headers()
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
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def fetch(gcs, out, **kw):
    kw = {"timeout": 5, "retries": 3, "backoff": 0.01, "progress": False, **kw}
    return data.download_pg19("validation", out, base_url=gcs.url, **kw)


def assert_complete(gcs, out):
    for name, content in gcs.files.items():
        if name.startswith("validation/") and not name.endswith("/") or name == "metadata.csv":
            assert (out / name).read_bytes() == content, name
    assert not (out / "test").exists()
    assert list(out.rglob("*.part")) == []


def test_download_split_with_paging_and_metadata(gcs, tmp_path):
    out = tmp_path / "pg19"
    paths = fetch(gcs, out)
    assert sorted(p.relative_to(out).as_posix() for p in paths) == sorted(
        [f"validation/{i}.txt" for i in range(5)] + ["metadata.csv"])
    assert_complete(gcs, out)
    listings = [p for p, _ in gcs.log if p.startswith("/storage/")]
    assert len(listings) == 3 + 1  # 6 objects under validation/ in pages of 2, then metadata.csv
    assert len(gcs.object_requests()) == 6
    # the result is a PG19-layout source
    assert [n for n, _ in data.iter_documents(out, split="validation")] == [f"{i}.txt" for i in range(5)]

    gcs.log.clear()
    fetch(gcs, out)
    assert gcs.object_requests() == [], "complete files are skipped"


def test_download_resumes_cut_transfer(gcs, tmp_path):
    out = tmp_path / "pg19"
    gcs.cut_once = {"validation/4.txt", "validation/2.txt"}
    fetch(gcs, out)
    assert_complete(gcs, out)
    size4 = len(gcs.files["validation/4.txt"])
    requests4 = [rng for path, rng in gcs.object_requests() if path.endswith("/validation/4.txt")]
    assert requests4 == [None, f"bytes={size4 // 2}-"]


def test_download_resumes_existing_part(gcs, tmp_path):
    out = tmp_path / "pg19"
    content = gcs.files["validation/3.txt"]
    (out / "validation").mkdir(parents=True)
    (out / "validation" / "3.txt.part").write_bytes(content[:700])
    (out / "validation" / "1.txt").write_bytes(gcs.files["validation/1.txt"])  # already complete
    fetch(gcs, out)
    assert_complete(gcs, out)
    by_path = dict(gcs.object_requests())
    assert by_path[f"/{BUCKET}/validation/3.txt"] == "bytes=700-"
    assert f"/{BUCKET}/validation/1.txt" not in by_path


def test_server_ignoring_range_restarts_from_zero(gcs, tmp_path):
    out = tmp_path / "pg19"
    (out / "validation").mkdir(parents=True)
    (out / "validation" / "0.txt.part").write_bytes(b"X" * 100)  # would corrupt the file if appended to
    gcs.ignore_range = True
    fetch(gcs, out)
    assert_complete(gcs, out)


def test_download_errors(gcs, tmp_path):
    out = tmp_path / "pg19"
    with pytest.raises(ValueError, match="unknown PG19 split 'dev'"):
        data.download_pg19("dev", out, base_url=gcs.url)
    with pytest.raises(OSError, match=r"/storage/v1/b/no-such-bucket/o\?prefix=validation%2F: HTTP 404"):
        data.download_pg19("validation", out, base_url=gcs.url, bucket="no-such-bucket", progress=False)
    gcs.cut_always = {"validation/2.txt"}
    with pytest.raises(OSError, match=r"validation/2.txt: failed after 3 attempts"):
        fetch(gcs, out, retries=2)
    assert not (out / "validation" / "2.txt").exists()
    assert (out / "validation" / "2.txt.part").is_file(), "kept for the next run to resume"
    gcs.cut_always = set()
    fetch(gcs, out)
    assert_complete(gcs, out)


def test_unreachable_server_fails_after_retries(tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError, match="failed after 2 attempts"):
        data.download_pg19("validation", tmp_path, base_url=f"http://127.0.0.1:{port}", timeout=2, retries=1,
                           backoff=0.01, progress=False)


def test_cli_download(gcs, tmp_path, capsys):
    out = tmp_path / "pg19"
    assert data.main(["download", "pg19", "--split", "validation", "--out", str(out), "--base-url", gcs.url]) == 0
    assert_complete(gcs, out)
    assert "6 files in" in capsys.readouterr().out
    assert data.main(["download", "pg19", "--split", "dev", "--out", str(out), "--base-url", gcs.url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: unknown PG19 split 'dev'; choose one of train, validation, test"]
    assert data.main(["download", "wikitext", "--out", str(out)]) == 2
    assert capsys.readouterr().err.startswith("error: unknown dataset 'wikitext'")
