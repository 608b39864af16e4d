"""Benchmark downloads (issue 15, defect 3): safe unpacking, digest pinned only after the contents check, failures
told apart and nothing left on disk. Archives are built here; nothing is served over the network (``_fetch`` is
replaced, or a file:// URL is used)."""
import errno
import http.client
import io
import json
import os
import shutil
import socket
import stat
import tarfile
import urllib.error
import zipfile

import numpy as np
import pytest
from PIL import Image

from causalir import data

TAR_BENCH, TAR_SUB = "Set14", "Set14_HR"  # a .tar.gz source
ZIP_BENCH, ZIP_SUB = "Set5", "Causal-IR-DIL-main/Set5/HR"  # a .zip source


def _png(seed=0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(seed).random((8, 8, 3)) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _tar(path, members, mode="w:gz"):
    """members: (name, kind, payload) with kind file | dir | sym | lnk | chr | blk | fifo."""
    types = {"sym": tarfile.SYMTYPE, "lnk": tarfile.LNKTYPE, "chr": tarfile.CHRTYPE, "blk": tarfile.BLKTYPE,
             "fifo": tarfile.FIFOTYPE, "dir": tarfile.DIRTYPE}
    with tarfile.open(path, mode) as tf:
        for name, kind, payload in members:
            ti = tarfile.TarInfo(name)
            if kind == "file":
                ti.size = len(payload)
                tf.addfile(ti, io.BytesIO(payload))
            else:
                ti.type = types[kind]
                if kind in ("sym", "lnk"):
                    ti.linkname = payload
                tf.addfile(ti)
    return path


def _zip(path, members):
    """members: (name, kind, payload) with kind file | sym | chr."""
    with zipfile.ZipFile(path, "w") as zf:
        for name, kind, payload in members:
            zi = zipfile.ZipInfo(name)
            mode = {"file": stat.S_IFREG | 0o644, "sym": stat.S_IFLNK | 0o777, "chr": stat.S_IFCHR | 0o644}[kind]
            zi.external_attr = mode << 16
            zf.writestr(zi, payload)
    return path


def _good_tar(path, seed=0):
    return _tar(path, [(f"{TAR_SUB}/a.png", "file", _png(seed)), (f"{TAR_SUB}/b.png", "file", _png(seed + 1))])


def _good_zip(path, seed=0):
    return _zip(path, [(f"{ZIP_SUB}/x.png", "file", _png(seed))])


@pytest.fixture
def serve(monkeypatch):
    """serve(path) makes every download receive that file; serve(exc) makes it fail with exc (after writing
    some bytes, as a broken-off transfer would)."""
    calls = []

    def set_(what):
        def fake(url, dest, timeout):
            calls.append(url)
            if isinstance(what, BaseException):
                dest.write_bytes(b"partial")
                raise what
            shutil.copyfile(what, dest)
        monkeypatch.setattr(data, "_fetch", fake)
        return calls
    return set_


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ------------------------------------------------------------------------------------------ unsafe archives
def _outside(tmp_path):
    return [tmp_path / "x", tmp_path / "evil", tmp_path / "cache" / "x"]


UNSAFE_TARS = {
    "dotdot": [(f"{TAR_SUB}/a.png", "file", _png()), ("../../x", "file", b"pwned")],
    "dotdot_inner": [(f"{TAR_SUB}/../../../x", "file", b"pwned")],
    "absolute": [(f"{TAR_SUB}/a.png", "file", _png()), ("/tmp/causalir-evil-x", "file", b"pwned")],
    "symlink_out": [(f"{TAR_SUB}/a.png", "file", _png()), (f"{TAR_SUB}/b.png", "sym", "/etc/passwd")],
    "symlink_in": [(f"{TAR_SUB}/a.png", "file", _png()), (f"{TAR_SUB}/b.png", "sym", "a.png")],
    "hardlink": [(f"{TAR_SUB}/a.png", "file", _png()), (f"{TAR_SUB}/b.png", "lnk", "/etc/passwd")],
    "chardev": [(f"{TAR_SUB}/a.png", "file", _png()), (f"{TAR_SUB}/null", "chr", "")],
    "blockdev": [(f"{TAR_SUB}/a.png", "file", _png()), (f"{TAR_SUB}/sda", "blk", "")],
    "fifo": [(f"{TAR_SUB}/a.png", "file", _png()), (f"{TAR_SUB}/pipe", "fifo", "")],
    "backslash": [(f"{TAR_SUB}/a.png", "file", _png()), ("..\\..\\x", "file", b"pwned")],
}
UNSAFE_ZIPS = {
    "dotdot": [(f"{ZIP_SUB}/x.png", "file", _png()), ("../../x", "file", b"pwned")],
    "absolute": [(f"{ZIP_SUB}/x.png", "file", _png()), ("/tmp/causalir-evil-x", "file", b"pwned")],
    "drive": [(f"{ZIP_SUB}/x.png", "file", _png()), ("C:/evil", "file", b"pwned")],
    "backslash": [(f"{ZIP_SUB}/x.png", "file", _png()), ("..\\..\\x", "file", b"pwned")],
    "symlink": [(f"{ZIP_SUB}/x.png", "file", _png()), (f"{ZIP_SUB}/y.png", "sym", b"/etc/passwd")],
    "device": [(f"{ZIP_SUB}/x.png", "file", _png()), (f"{ZIP_SUB}/null", "chr", b"")],
}


@pytest.mark.parametrize("case", sorted(UNSAFE_TARS))
def test_unsafe_tar_refused_nothing_written(tmp_path, serve, case):
    serve(_tar(tmp_path / "a.tar.gz", UNSAFE_TARS[case]))
    with pytest.raises(ValueError, match="refusing the archive"):
        data.download(TAR_BENCH, root=tmp_path / "cache")
    assert not any(p.exists() for p in _outside(tmp_path)) and not os.path.exists("/tmp/causalir-evil-x")
    assert _files(tmp_path / "cache") == []  # no folder, no digest, no staging


@pytest.mark.parametrize("case", sorted(UNSAFE_ZIPS))
def test_unsafe_zip_refused_nothing_written(tmp_path, serve, case):
    serve(_zip(tmp_path / "a.zip", UNSAFE_ZIPS[case]))
    with pytest.raises(ValueError, match="refusing the archive"):
        data.download(ZIP_BENCH, root=tmp_path / "cache")
    assert not any(p.exists() for p in _outside(tmp_path)) and not os.path.exists("/tmp/causalir-evil-x")
    assert _files(tmp_path / "cache") == []


def test_tar_uses_the_data_filter(tmp_path, serve, monkeypatch):
    seen = []
    real = tarfile.TarFile.extractall

    def spy(self, *a, **k):
        seen.append(k.get("filter"))
        return real(self, *a, **k)
    monkeypatch.setattr(tarfile.TarFile, "extractall", spy)
    serve(_good_tar(tmp_path / "a.tar.gz"))
    with pytest.warns(UserWarning, match="trust on first use"):
        folder = data.download(TAR_BENCH, root=tmp_path / "cache")
    assert seen == ["data"] and len(data.folder_images(folder)) == 2


BAD_CONTENTS = {
    "not_an_archive": lambda p: (p.write_bytes(b"<html>rate limited</html>"), p)[1],
    "truncated_tar": lambda p: (p.write_bytes(_good_tar(p).read_bytes()[:60]), p)[1],
    "truncated_zip": lambda p: (p.write_bytes(_good_zip(p).read_bytes()[:-30]), p)[1],
    "no_subdir": lambda p: _tar(p, [("other/a.png", "file", _png())]),
    "no_images": lambda p: _tar(p, [(f"{TAR_SUB}/readme.txt", "file", b"hi")]),
    "empty_subdir": lambda p: _tar(p, [(TAR_SUB, "dir", "")]),
}


@pytest.mark.parametrize("case", sorted(BAD_CONTENTS))
def test_bad_contents_refused_and_not_pinned(tmp_path, serve, case):
    """A wrong first download is never trusted: no digest is pinned, so the right archive is accepted next."""
    serve(BAD_CONTENTS[case](tmp_path / "bad"))
    with pytest.raises(ValueError, match="nothing was kept"):
        data.download(TAR_BENCH, root=tmp_path / "cache")
    assert _files(tmp_path / "cache") == []
    serve(_good_tar(tmp_path / "good.tar.gz"))
    with pytest.warns(UserWarning, match="trust on first use"):
        folder = data.download(TAR_BENCH, root=tmp_path / "cache")
    assert len(data.folder_images(folder)) == 2
    rec = json.loads((tmp_path / "cache" / TAR_BENCH / "sha256.json").read_text())
    assert rec["sha256"] == data._sha256(tmp_path / "good.tar.gz") and "trust on first use" in rec["pinned"]


# ------------------------------------------------------------------------------------------ digests
def test_trust_on_first_use_then_mismatch(tmp_path, serve):
    root = tmp_path / "cache"
    calls = serve(_good_zip(tmp_path / "a.zip", 0))
    with pytest.warns(UserWarning, match="trust on first use"):
        folder = data.download(ZIP_BENCH, root=root)
    assert data.download(ZIP_BENCH, root=root) == folder and len(calls) == 1  # cached: no second fetch
    before = _files(root)
    assert [p for p in before if "archive" in p or ".download-" in p] == []  # no archive or staging kept
    shutil.rmtree(folder)
    serve(_good_zip(tmp_path / "b.zip", 5))  # a different archive
    with pytest.raises(ValueError, match="checksum mismatch.*trust on first use") as e:
        data.download(ZIP_BENCH, root=root)
    assert "sha256.json" in str(e.value)
    assert not folder.exists() and (root / ZIP_BENCH / "sha256.json").exists()
    assert not [p for p in _files(root) if ".download-" in p]
    serve(tmp_path / "a.zip")  # the pinned one again: accepted, replacing the stale partial top folder
    assert data.download(ZIP_BENCH, root=root) == folder and len(data.folder_images(folder)) == 1


@pytest.mark.parametrize("good", [True, False])
def test_published_digest(tmp_path, serve, monkeypatch, good):
    arc = _good_tar(tmp_path / "a.tar.gz")
    digest = data._sha256(arc) if good else "0" * 64
    monkeypatch.setitem(data.BENCHMARKS._items, TAR_BENCH,
                        lambda: data.Benchmark(TAR_BENCH, "https://example.invalid/x.tar.gz", digest, TAR_SUB, ""))
    serve(arc)
    root = tmp_path / "cache"
    if good:
        folder = data.download(TAR_BENCH, root=root)  # no warning: the digest is published
        assert len(data.folder_images(folder)) == 2 and not (root / TAR_BENCH / "sha256.json").exists()
    else:
        with pytest.raises(ValueError, match="checksum mismatch.*published by the source"):
            data.download(TAR_BENCH, root=root)
        assert _files(root) == []


@pytest.mark.parametrize("content", ['{"sha256": "00"}', "not json", '{"sha": 1}', '["x"]', '{"sha256": null}'])
def test_malformed_lock_refused(tmp_path, serve, content):
    (tmp_path / "cache" / TAR_BENCH).mkdir(parents=True)
    (tmp_path / "cache" / TAR_BENCH / "sha256.json").write_text(content)
    serve(_good_tar(tmp_path / "a.tar.gz"))
    with pytest.raises(ValueError, match="sha256.json is unreadable or malformed"):
        data.download(TAR_BENCH, root=tmp_path / "cache")
    assert _files(tmp_path / "cache") == [TAR_BENCH, f"{TAR_BENCH}/sha256.json"]


# ------------------------------------------------------------------------------------------ fetch failures
FAILURES = {
    "http404": (urllib.error.HTTPError("u", 404, "Not Found", {}, None), FileNotFoundError, "HTTP 404"),
    "http410": (urllib.error.HTTPError("u", 410, "Gone", {}, None), FileNotFoundError, "HTTP 410"),
    "http500": (urllib.error.HTTPError("u", 500, "Server Error", {}, None), ConnectionError, "HTTP 500"),
    "http403": (urllib.error.HTTPError("u", 403, "Forbidden", {}, None), ConnectionError, "HTTP 403"),
    "missing_file": (urllib.error.URLError(FileNotFoundError(2, "No such file or directory")), FileNotFoundError,
                     "no such file"),
    "unreadable_file": (urllib.error.URLError(PermissionError(13, "Permission denied")), PermissionError,
                        "permission denied"),
    "refused": (urllib.error.URLError(ConnectionRefusedError(111, "refused")), ConnectionError, "offline"),
    "dns": (urllib.error.URLError(socket.gaierror(-2, "Name or service not known")), ConnectionError, "offline"),
    "connect_timeout": (urllib.error.URLError(TimeoutError("timed out")), ConnectionError, "offline"),
    "read_timeout": (TimeoutError("timed out"), ConnectionError, "broke off"),
    "reset": (ConnectionResetError(104, "reset"), ConnectionError, "broke off"),
    "incomplete": (http.client.IncompleteRead(b"x", 10), ConnectionError, "broke off"),
    "disk_full": (OSError(errno.ENOSPC, "No space left on device"), OSError, "could not write"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_fetch_failures_told_apart_and_nothing_left(tmp_path, serve, case):
    exc, kind, msg = FAILURES[case]
    serve(exc)
    with pytest.raises(kind, match=msg) as e:
        data.download(TAR_BENCH, root=tmp_path / "cache" / "deep" / "er")  # folders it made are removed too
    if kind is not ConnectionError or "HTTP" in msg:
        assert "offline" not in str(e.value)  # a missing file or an HTTP error is not "you seem to be offline"
    assert not (tmp_path / "cache").exists()


def test_failure_keeps_what_was_there(tmp_path, serve):
    root = tmp_path / "cache"
    (root / TAR_BENCH).mkdir(parents=True)
    (root / "other.txt").write_text("mine")
    serve(urllib.error.HTTPError("u", 404, "Not Found", {}, None))
    with pytest.raises(FileNotFoundError):
        data.download(TAR_BENCH, root=root)
    assert _files(root) == [TAR_BENCH, "other.txt"]


def test_file_urls_without_network(tmp_path):
    """The real fetch on file:// URLs: a missing file is 'not found', not 'offline'; an existing one works."""
    with pytest.raises(FileNotFoundError, match="no such file") as e:
        data.download(TAR_BENCH, root=tmp_path / "cache", url=(tmp_path / "missing.tar.gz").as_uri())
    assert "offline" not in str(e.value) and not (tmp_path / "cache").exists()
    arc = _good_tar(tmp_path / "a.tar.gz")
    with pytest.warns(UserWarning, match="trust on first use"):
        folder = data.download(TAR_BENCH, root=tmp_path / "cache", url=arc.as_uri())
    assert len(data.benchmark_images(TAR_BENCH, root=tmp_path / "cache")) == 2 == len(list(folder.iterdir()))


def test_stale_staging_of_dead_process_removed(tmp_path, serve):
    target = tmp_path / "cache" / TAR_BENCH
    dead = target / ".download-999999999-abc"
    (dead / "unpacked").mkdir(parents=True)
    live = target / f".download-{os.getpid()}-keep"
    live.mkdir()
    serve(_good_tar(tmp_path / "a.tar.gz"))
    with pytest.warns(UserWarning):
        data.download(TAR_BENCH, root=tmp_path / "cache")
    assert not dead.exists() and live.exists()


# ------------------------------------------------------------------------------------------ arguments
@pytest.mark.parametrize("kw, kind, msg", [
    ({"timeout": 0}, ValueError, "download.timeout"),
    ({"timeout": -1}, ValueError, "download.timeout"),
    ({"timeout": float("nan")}, ValueError, "download.timeout"),
    ({"timeout": "60"}, TypeError, "download.timeout"),
    ({"url": 3}, TypeError, "url"),
    ({"url": "ftp://host/x.zip"}, ValueError, "url"),
    ({"url": "not a url"}, ValueError, "url"),
    ({"url": ""}, ValueError, "url"),
    ({"root": 3}, TypeError, "root"),
])
def test_download_bad_arguments(tmp_path, serve, kw, kind, msg):
    calls = serve(_good_tar(tmp_path / "a.tar.gz"))
    kw = {"root": tmp_path / "cache", **kw}
    with pytest.raises(kind, match=msg):
        data.download(TAR_BENCH, **kw)
    assert calls == [] and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("name", ["set5", "", None, 5])
def test_unknown_benchmark(tmp_path, name):
    with pytest.raises(KeyError, match="valid names"):
        data.download(name, root=tmp_path)
    with pytest.raises(KeyError, match="valid names"):
        data.benchmark_images(name, root=tmp_path)
