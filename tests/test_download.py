"""MNIST downloads from a real HTTP server on 127.0.0.1 that fails in every way a mirror can.

Each failure must end in one :class:`MNISTUnavailableError` (for ``fastgrad
train``: the one-line fallback to the embedded subset) and leave no file, whole
or partial, in the cache. The command-line cases run ``python -m fastgrad`` in
a subprocess pointed at the server by ``$FASTGRAD_MNIST_URL``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import struct
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from fastgrad import data
from fastgrad.data import MNISTError, MNISTUnavailableError, download
from fastgrad.train import TrainingHistory

ROOT = Path(__file__).resolve().parents[1]
SHARED_MNIST = ROOT / ".." / "shared" / "data" / "mnist"
NAMES = tuple(data.CHECKSUMS)
SUBSET_NOTE = "using the embedded subset (10,000 train / 2,000 test images)"
TIMEOUT = 0.5


# ------------------------------------------------------------------ the server
class _Mirror(BaseHTTPRequestHandler):
    """``GET /<mode>/<file>``: the file, or the failure ``mode`` names."""

    def log_message(self, format, *args):  # quiet: the tests read stderr
        pass

    def do_GET(self):
        mode, _, name = self.path.strip("/").partition("/")
        body = self.server.files.get(name)
        if mode == "missing" or body is None:
            self.send_error(404, "Not Found")
            return
        if mode == "hangup":  # read the request, answer nothing, close
            return
        if mode == "slow":  # never answer within the client's timeout
            self.server.stop.wait(30)
            return
        if mode == "corrupt":
            body = b"\x1f\x8b" + b"this is not deflate data " * 40
        if mode == "wrong":  # valid gzip, valid IDX, not the file
            body = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if mode in ("truncated", "stall"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if mode == "stall":
                self.server.stop.wait(30)
            return  # HTTP/1.0: the connection closes, short of Content-Length
        self.wfile.write(body)


class Servers:
    def __init__(self, files: dict[str, bytes]):
        self.stop = threading.Event()
        self.http = ThreadingHTTPServer(("127.0.0.1", 0), _Mirror)
        self.http.daemon_threads = True
        self.http.files = files
        self.http.stop = self.stop
        self.garbage = socket.create_server(("127.0.0.1", 0))
        self.garbage.settimeout(0.1)
        # A port nothing listens on: bound, then closed.
        with socket.create_server(("127.0.0.1", 0)) as probe:
            self.closed_port = probe.getsockname()[1]
        self.threads = [
            threading.Thread(target=self.http.serve_forever, daemon=True),
            threading.Thread(target=self._speak_garbage, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _speak_garbage(self):
        """A TCP server that answers every request with an SSH banner, not HTTP."""
        while not self.stop.is_set():
            try:
                connection, _ = self.garbage.accept()
            except (TimeoutError, OSError):
                continue
            with connection:
                connection.settimeout(5)
                try:
                    connection.recv(65536)
                    connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
                except OSError:
                    pass

    def url(self, mode: str) -> str:
        if mode == "garbage":
            return f"http://127.0.0.1:{self.garbage.getsockname()[1]}/"
        if mode == "refused":
            return f"http://127.0.0.1:{self.closed_port}/"
        return f"http://127.0.0.1:{self.http.server_address[1]}/{mode}/"

    def close(self):
        self.stop.set()
        self.http.shutdown()
        self.http.server_close()
        self.garbage.close()
        for thread in self.threads:
            thread.join(timeout=10)


def small_idx_files() -> dict[str, bytes]:
    """Four small IDX files with MNIST's names, uncompressed."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(6) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (4, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(4) % 10).astype(np.uint8),
    }
    files = {}
    for name, array in arrays.items():
        header = struct.pack(">HBB", 0, 0x08, array.ndim)
        header += b"".join(struct.pack(">I", size) for size in array.shape)
        files[name] = header + array.tobytes()
    return files


@pytest.fixture
def small_mirror(monkeypatch):
    """The server, serving small MNIST-named files whose checksums are made the known ones."""
    raw = small_idx_files()
    checksums = {name: hashlib.sha256(body).hexdigest() for name, body in raw.items()}
    monkeypatch.setattr(data, "CHECKSUMS", checksums)
    monkeypatch.setattr(data, "_SPLITS", {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", 6),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", 4),
    })
    # Big enough that half a file is many reads, as a real cut connection.
    servers = Servers(
        {f"{name}.gz": gzip.compress(body, compresslevel=0) for name, body in raw.items()}
    )
    yield servers
    servers.close()


@pytest.fixture
def real_mirror():
    """The server, serving whatever is in the shared MNIST folder (random bytes if absent)."""
    files = {}
    for name in NAMES:
        path = SHARED_MNIST / f"{name}.gz"
        files[f"{name}.gz"] = path.read_bytes() if path.is_file() else os.urandom(200_000)
    servers = Servers(files)
    yield servers
    servers.close()


def no_files_left(directory: Path) -> bool:
    return not directory.exists() or list(directory.iterdir()) == []


# ------------------------------------------------------- download() itself
FAILURES = {
    "missing": "HTTP 404 Not Found",
    "truncated": "the connection closed after ",
    "stall": f"the download stalled: nothing for {TIMEOUT:g} s after ",
    "slow": f"no answer within {TIMEOUT:g} s ($FASTGRAD_DOWNLOAD_TIMEOUT sets the limit)",
    "hangup": "the server closed the connection without answering",
    "garbage": "the server does not speak HTTP (BadStatusLine: 'SSH-2.0-OpenSSH_9.6",
    "corrupt": "the copy served is not valid gzip data",
    "wrong": "the copy served fails its checksum (sha256 ",
    "refused": "Connection refused",
}


@pytest.mark.parametrize("mode", list(FAILURES))
def test_every_failure_is_one_unavailable_error_and_leaves_no_file(small_mirror, tmp_path, mode):
    cache = tmp_path / "cache"
    with pytest.raises(MNISTUnavailableError) as raised:
        download(NAMES, cache, mirrors=[small_mirror.url(mode)], timeout=TIMEOUT)
    message = str(raised.value)
    assert message.startswith(
        f"could not download train-images-idx3-ubyte ({small_mirror.url(mode)}"
        "train-images-idx3-ubyte.gz: "
    )
    assert FAILURES[mode] in message and "\n" not in message
    assert raised.value.brief == (
        f"not in {cache}, and the download failed: {message.split('.gz: ', 1)[1].split(');')[0]}"
    )
    assert FAILURES[mode] in raised.value.brief
    assert no_files_left(cache)


def test_the_truncated_download_says_how_much_arrived(small_mirror, tmp_path):
    size = len(small_mirror.http.files["train-images-idx3-ubyte.gz"])
    with pytest.raises(MNISTUnavailableError, match=(
        rf"the connection closed after {size // 2:,} of the {size:,} bytes announced"
    )):
        download(NAMES[:1], tmp_path, mirrors=[small_mirror.url("truncated")], timeout=TIMEOUT)
    assert list(tmp_path.iterdir()) == []


def test_every_mirror_is_tried_and_the_good_copy_kept(small_mirror, tmp_path):
    mirrors = [small_mirror.url(mode) for mode in ("truncated", "garbage", "corrupt", "ok")]
    download(NAMES, tmp_path, mirrors=mirrors, timeout=TIMEOUT)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(f"{n}.gz" for n in NAMES)
    (x_train, t_train), (x_test, _) = data.load_mnist(data_dir=tmp_path, normalize=False)
    assert x_train.shape == (6, 784) and x_test.shape == (4, 784)
    assert t_train.tolist() == [0, 1, 2, 3, 4, 5]


def test_when_all_mirrors_fail_each_is_named(small_mirror, tmp_path):
    mirrors = [small_mirror.url(mode) for mode in ("missing", "hangup")]
    with pytest.raises(MNISTUnavailableError) as raised:
        download(NAMES[:1], tmp_path, mirrors=mirrors, timeout=TIMEOUT)
    assert (
        f"{mirrors[0]}train-images-idx3-ubyte.gz: HTTP 404 Not Found; "
        f"{mirrors[1]}train-images-idx3-ubyte.gz: the server closed the connection without "
        "answering); get the four MNIST files elsewhere"
    ) in str(raised.value)
    assert raised.value.brief.endswith("the download failed: HTTP 404 Not Found")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_mid_download_leaves_no_partial_file(small_mirror, tmp_path, monkeypatch):
    def interrupted(path, name):
        assert path.stat().st_size > 0  # the temporary file was written
        raise KeyboardInterrupt

    monkeypatch.setattr(data, "_check_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        download(NAMES[:1], tmp_path, mirrors=[small_mirror.url("ok")], timeout=TIMEOUT)
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_good_file_survives_a_later_failure(small_mirror, tmp_path):
    download(NAMES[:1], tmp_path, mirrors=[small_mirror.url("ok")], timeout=TIMEOUT)
    kept = (tmp_path / f"{NAMES[0]}.gz").read_bytes()
    with pytest.raises(MNISTUnavailableError):
        download(NAMES[:2], tmp_path, mirrors=[small_mirror.url("truncated")], timeout=TIMEOUT)
    assert [path.name for path in tmp_path.iterdir()] == [f"{NAMES[0]}.gz"]
    assert (tmp_path / f"{NAMES[0]}.gz").read_bytes() == kept


def test_the_variables_choose_the_mirror_and_the_timeout(small_mirror, tmp_path, monkeypatch):
    both = f"{small_mirror.url('missing')} {small_mirror.url('ok')}"
    monkeypatch.setenv(data.ENV_MNIST_URL, both)
    download(NAMES[:1], tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == [f"{NAMES[0]}.gz"]
    monkeypatch.setenv(data.ENV_MNIST_URL, small_mirror.url("slow").rstrip("/"))  # "/" added
    monkeypatch.setenv(data.ENV_DOWNLOAD_TIMEOUT, "0.2")
    with pytest.raises(MNISTUnavailableError, match=r"slow/train-labels-idx1-ubyte\.gz: no answer "
                       r"within 0\.2 s"):
        download(NAMES[1:2], tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == [f"{NAMES[0]}.gz"]


@pytest.mark.parametrize("value", ["ftp://example.org/mnist/", "example.org/mnist", "http://"])
def test_a_bad_url_variable_is_named(monkeypatch, tmp_path, value):
    monkeypatch.setenv(data.ENV_MNIST_URL, value)
    with pytest.raises(MNISTError, match=(
        rf"^\$FASTGRAD_MNIST_URL: '{value}' is not an http://, https:// or file:// base URL"
    )) as raised:
        download(NAMES[:1], tmp_path)
    assert not isinstance(raised.value, MNISTUnavailableError)  # a mistake to fix, no fallback
    assert list(tmp_path.iterdir()) == []


def test_a_bad_mirrors_argument_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match=r"^mirrors: 'nonsense' is not an http://"):
        download(NAMES[:1], tmp_path, mirrors=["nonsense"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_a_bad_timeout_variable_is_named(monkeypatch, tmp_path, value):
    monkeypatch.setenv(data.ENV_DOWNLOAD_TIMEOUT, value)
    with pytest.raises(MNISTError, match=(
        rf"^\$FASTGRAD_DOWNLOAD_TIMEOUT='{value}' is not a number of seconds > 0; unset it"
    )):
        download(NAMES[:1], tmp_path, mirrors=["http://127.0.0.1:9/"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", [0, -2.0, float("nan"), float("inf")])
def test_a_bad_timeout_argument_is_a_value_error(tmp_path, value):
    with pytest.raises(ValueError, match=rf"^timeout={value!r} is not a number of seconds > 0"):
        download(NAMES[:1], tmp_path, mirrors=["http://127.0.0.1:9/"], timeout=value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("value", "kind"), [(True, "bool"), ("3", "str"), ([1], "list")])
def test_a_timeout_of_another_type_is_a_type_error(tmp_path, value, kind):
    with pytest.raises(TypeError, match=rf"^timeout must be a number of seconds, got {kind}$"):
        download(NAMES[:1], tmp_path, mirrors=["http://127.0.0.1:9/"], timeout=value)
    assert list(tmp_path.iterdir()) == []


def test_a_cache_that_cannot_be_written_is_unavailable(small_mirror, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(MNISTUnavailableError, match=r"^cannot write the MNIST") as raised:
        download(NAMES[:1], blocker / "cache", mirrors=[small_mirror.url("ok")])
    assert raised.value.brief.startswith(f"not in {blocker / 'cache'}, which cannot be written")
    assert blocker.read_text() == "in the way"


# ------------------------------------------------------- fastgrad train
def train_command(tmp_path: Path, url: str, *, timeout: str = str(TIMEOUT)):
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("FASTGRAD_DATA_DIR", "FASTGRAD_BACKEND")
    }
    environment.update(
        XDG_CACHE_HOME=str(tmp_path / "cache"),
        FASTGRAD_MNIST_URL=url,
        FASTGRAD_DOWNLOAD_TIMEOUT=timeout,
    )
    return subprocess.run(
        [sys.executable, "-m", "fastgrad", "train", "--iters", "2", "--hidden", "4",
         "--backend", "numpy", "--seed", "0", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, env=environment, cwd=ROOT, timeout=300,
    )


@pytest.mark.parametrize(
    "mode", ["missing", "truncated", "stall", "slow", "hangup", "garbage", "corrupt", "refused"]
)
def test_the_command_falls_back_in_one_line_after_any_failure(real_mirror, tmp_path, mode):
    result = train_command(tmp_path, real_mirror.url(mode))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    cache = tmp_path / "cache" / "fastgrad" / "mnist"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(
        f"fastgrad: full MNIST is unavailable (not in {cache}, and the download failed: "
    )
    assert FAILURES[mode] in lines[0] and lines[0].endswith(f"); {SUBSET_NOTE}")
    assert no_files_left(cache)
    history = TrainingHistory.load(tmp_path / "run" / "history.json")
    assert history.config["dataset"] == "mnist-mini" and len(history.losses) == 2


@pytest.mark.skipif(
    not all((SHARED_MNIST / f"{name}.gz").is_file() for name in NAMES),
    reason="needs the four MNIST files in ../shared/data/mnist",
)
def test_the_command_downloads_verifies_and_trains_on_full_mnist(real_mirror, tmp_path):
    result = train_command(tmp_path, real_mirror.url("ok"))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "with mnist: 60,000 train / 10,000 test images" in result.stdout
    cache = tmp_path / "cache" / "fastgrad" / "mnist"
    assert sorted(path.name for path in cache.iterdir()) == sorted(f"{n}.gz" for n in NAMES)
    for name in NAMES:
        assert (cache / f"{name}.gz").read_bytes() == (SHARED_MNIST / f"{name}.gz").read_bytes()
    history = TrainingHistory.load(tmp_path / "run" / "history.json")
    assert history.config["dataset"] == "mnist"


@pytest.mark.parametrize(
    ("variable", "value", "fragment"),
    [
        ("FASTGRAD_MNIST_URL", "ftp://example.org/", "$FASTGRAD_MNIST_URL: 'ftp://example.org/' "
         "is not an http://, https:// or file:// base URL"),
        ("FASTGRAD_DOWNLOAD_TIMEOUT", "0", "$FASTGRAD_DOWNLOAD_TIMEOUT='0' is not a number of "
         "seconds > 0"),
    ],
)
def test_a_bad_download_variable_stops_the_command_in_one_line(
    real_mirror, tmp_path, variable, value, fragment
):
    url = value if variable == "FASTGRAD_MNIST_URL" else real_mirror.url("ok")
    timeout = value if variable == "FASTGRAD_DOWNLOAD_TIMEOUT" else str(TIMEOUT)
    result = train_command(tmp_path, url, timeout=timeout)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"fastgrad: error: {fragment}")
    assert not (tmp_path / "run").exists()
