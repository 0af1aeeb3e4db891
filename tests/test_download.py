"""The download stage against the real Omniglot zips kept beside the repo (the local mirror).

Fetches once per module and reuses that copy as the "earlier good copy" the failure tests must
leave untouched. Modified mirrors rebuild only the smaller evaluation zip to stay fast.
"""

from __future__ import annotations

import functools
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from mamlops.config import DataConfig
from mamlops.data import download
from mamlops.data.download import DataError, fetch_omniglot, resolve_mirror, verify_omniglot
from mamlops.files import work_dir
from mamlops.params import load_params
from mamlops.urls import join, redact

MIRROR = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
REPO = Path(__file__).resolve().parents[1]
EVAL_ZIP = "images_evaluation.zip"

pytestmark = pytest.mark.skipif(
    not (MIRROR / EVAL_ZIP).is_file(), reason=f"Omniglot mirror not found at {MIRROR}"
)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder without logging every request to stderr; counts what was fetched."""

    requested: list[str] = []

    def log_message(self, format: str, *args: object) -> None:
        type(self).requested.append(self.path)


@pytest.fixture
def serve() -> Iterator[Callable[[Path], str]]:
    """Start a threaded HTTP server on 127.0.0.1 (port 0) for a folder; returns its URL base."""
    servers: list[tuple[http.server.ThreadingHTTPServer, threading.Thread]] = []

    def start(folder: Path) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        servers.append((server, thread))
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server, thread in servers:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def fetched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict]]:
    """One real fetch from the local mirror folder, shared by the tests below.

    Removed afterwards: pytest keeps old temp dirs, and 32k files each slow every later run.
    """
    dest = tmp_path_factory.mktemp("raw") / "omniglot"
    yield dest, fetch_omniglot(dest, str(MIRROR), progress=False)
    shutil.rmtree(dest.parent, ignore_errors=True)


@pytest.fixture(autouse=True)
def _drop_tmp_trees(tmp_path: Path) -> Iterator[None]:
    """Delete each test's tmp_path after it (extracted trees are large; see ``fetched``)."""
    yield
    shutil.rmtree(tmp_path, ignore_errors=True)


def _leftovers(dest: Path) -> list[str]:
    """Temporary folders the stage left beside ``dest`` (there must be none)."""
    return [p.name for p in dest.parent.iterdir() if p.name != dest.name]


def _dead_pid() -> int:
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    )
    return int(proc.stdout)


def _abandoned_workdir(dest: Path, host: str | None = None, pid: int | None = None) -> Path:
    host = socket.gethostname() if host is None else host
    pid = _dead_pid() if pid is None else pid
    path = dest.parent / f".{dest.name}-tmp-{host}-{pid}-abc_123"
    (path / "staged").mkdir(parents=True)
    (path / "staged" / "half.png").write_bytes(b"\x89PNG")
    return path


def test_sweep_removes_only_abandoned_workdirs(tmp_path: Path) -> None:
    dest = tmp_path / "omniglot"
    dead = _abandoned_workdir(dest)
    other_host = _abandoned_workdir(dest, host="some-other-node-7")  # young: may be starting
    unknown = dest.parent / f".{dest.name}-tmp-xyz"
    unknown.mkdir()
    with work_dir(dest) as live:  # a live download's, held by its lock
        assert download.sweep_abandoned(dest) == [dead]
        assert not dead.exists() and live.exists() and other_host.exists() and unknown.exists()


def _snapshot(dest: Path) -> tuple[int, str]:
    """Identity of an installed copy: the folder's inode and its VERIFIED.json text."""
    return dest.stat().st_ino, (dest / download.VERIFIED_NAME).read_text()


def _assert_untouched(dest: Path, before: tuple[int, str]) -> None:
    assert _snapshot(dest) == before  # same folder (no swap), same marker
    sample = dest / "images_evaluation" / "Angelic" / "character01" / "0965_01.png"
    with zipfile.ZipFile(MIRROR / EVAL_ZIP) as archive:
        assert sample.read_bytes() == archive.read(
            "images_evaluation/Angelic/character01/0965_01.png"
        )
    assert _leftovers(dest) == []


def _bad_mirror(tmp_path: Path, change: Callable[[str, bytes], bytes | None]) -> Path:
    """A mirror folder: the real background zip linked, the evaluation zip rebuilt via ``change``.

    ``change(name, data)`` returns the member's new bytes, or None to drop the member.
    """
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "images_background.zip").symlink_to(MIRROR / "images_background.zip")
    with (
        zipfile.ZipFile(MIRROR / EVAL_ZIP) as src,
        zipfile.ZipFile(mirror / EVAL_ZIP, "w", zipfile.ZIP_STORED) as dst,
    ):
        for info in src.infolist():
            data = change(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data)
    return mirror


@pytest.fixture
def eval_only(monkeypatch) -> None:
    """Handle only the smaller evaluation set: the same code path at a third of the cost."""
    monkeypatch.setattr(download, "SETS", ("images_evaluation",))


def _first_png(name: str) -> bool:
    return name.endswith("images_evaluation/Angelic/character01/0965_01.png")


def test_fetch_from_local_mirror(fetched: tuple[Path, dict]) -> None:
    dest, summary = fetched
    record = download.load_record()["sets"]
    assert summary["skipped"] is False
    # the stage records the resolved folder; ../shared may be reached through a symlink
    assert Path(summary["source"]).resolve() == MIRROR.resolve()
    for name in download.SETS:
        assert summary["fingerprints"][name] == record[name]["fingerprint"]
    assert summary["counts"]["images_background"] == {"characters": 964, "images": 19280}
    assert summary["counts"]["images_evaluation"] == {"characters": 659, "images": 13180}
    png = dest / "images_background" / "Alphabet_of_the_Magi" / "character01" / "0709_01.png"
    assert png.is_file()
    marker = json.loads((dest / "VERIFIED.json").read_text())
    assert marker["fingerprints"] == summary["fingerprints"]
    assert _leftovers(dest) == []


def test_verified_copy_is_kept(fetched: tuple[Path, dict], monkeypatch) -> None:
    dest, summary = fetched
    before = _snapshot(dest)

    def no_fetch(*args: object) -> Path:
        raise AssertionError("a verified copy must not be fetched again")

    monkeypatch.setattr(download, "_fetch_zip", no_fetch)
    again = fetch_omniglot(dest, "/nonexistent/mirror", progress=False)
    assert again["skipped"] is True
    assert again["fingerprints"] == summary["fingerprints"]
    assert _snapshot(dest) == before


def test_fetch_over_http_replaces_earlier_copy(
    tmp_path: Path, serve, fetched: tuple[Path, dict], eval_only: None
) -> None:
    """Real HTTP on loopback; the evaluation set only, as the full path is covered above."""
    dest = tmp_path / "omniglot"
    dest.mkdir()
    (dest / download.VERIFIED_NAME).write_text("{}")  # an earlier copy, to be replaced
    abandoned = _abandoned_workdir(dest)  # as a download killed with SIGKILL leaves it
    before = _snapshot(dest)
    _QuietHandler.requested.clear()
    base = serve(MIRROR)
    summary = fetch_omniglot(dest, base.rstrip("/"), force=True, progress=True)
    assert summary["source"] == base
    assert summary["fingerprints"] == {
        "images_evaluation": fetched[1]["fingerprints"]["images_evaluation"]
    }
    assert _QuietHandler.requested == ["/" + EVAL_ZIP]
    assert _snapshot(dest) != before  # swapped in: a new folder with its own marker
    assert not abandoned.exists()
    assert _leftovers(dest) == []
    # the tracked output says what the data is, not where it came from: the same bytes (and DVC
    # hash) from HTTP as from a local folder
    local = tmp_path / "from-folder"
    fetch_omniglot(local, str(MIRROR), progress=False)
    marker = (dest / download.VERIFIED_NAME).read_text()
    assert marker == (local / download.VERIFIED_NAME).read_text()
    assert "source" not in json.loads(marker) and str(MIRROR) not in marker


def test_short_http_download_is_named(tmp_path: Path) -> None:
    class Short(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Short)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/images_background.zip"
        with pytest.raises(DataError, match=r"images_background\.zip.*(truncated|interrupted)"):
            download._download(url, tmp_path / "z.zip", progress=False)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_truncated_zip_keeps_earlier_copy(tmp_path: Path, fetched: tuple[Path, dict]) -> None:
    dest, _ = fetched
    before = _snapshot(dest)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "images_background.zip").symlink_to(MIRROR / "images_background.zip")
    data = (MIRROR / EVAL_ZIP).read_bytes()
    (mirror / EVAL_ZIP).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"images_evaluation\.zip.*MAMLOPS_DATA_MIRROR"):
        fetch_omniglot(dest, str(mirror), force=True, progress=False)
    _assert_untouched(dest, before)


def _reencoded(name: str, data: bytes) -> bytes:
    """Same pixels, different bytes: a PNG that decodes but is not the release's file."""
    if not _first_png(name):
        return data
    out = io.BytesIO()
    Image.open(io.BytesIO(data)).save(out, format="PNG", compress_level=0)
    assert out.getvalue() != data
    return out.getvalue()


def test_wrong_fingerprint_keeps_earlier_copy(
    tmp_path: Path, fetched: tuple[Path, dict], eval_only: None
) -> None:
    dest, _ = fetched
    before = _snapshot(dest)
    mirror = _bad_mirror(tmp_path, _reencoded)
    with pytest.raises(DataError, match=r"images_evaluation: content fingerprint .* recorded"):
        fetch_omniglot(dest, str(mirror), force=True, progress=False)
    _assert_untouched(dest, before)


def test_undecodable_png_is_named(
    tmp_path: Path, fetched: tuple[Path, dict], eval_only: None
) -> None:
    dest, _ = fetched
    before = _snapshot(dest)
    mirror = _bad_mirror(tmp_path, lambda n, d: d[:60] if _first_png(n) else d)
    with pytest.raises(DataError, match=r"Angelic/character01/0965_01\.png: PNG does not decode"):
        fetch_omniglot(dest, str(mirror), force=True, progress=False)
    _assert_untouched(dest, before)


def test_missing_character_is_named(
    tmp_path: Path, fetched: tuple[Path, dict], eval_only: None
) -> None:
    dest, _ = fetched
    copy = tmp_path / "omniglot"
    for name in download.SETS:  # hard links: fast, same bytes
        shutil.copytree(dest / name, copy / name, copy_function=os.link)
    shutil.rmtree(copy / "images_evaluation" / "Angelic" / "character03")
    with pytest.raises(DataError, match=r"1 character folder\(s\) missing: Angelic/character03"):
        verify_omniglot(copy)


def test_resolve_mirror(monkeypatch) -> None:
    monkeypatch.delenv(download.ENV_MIRROR, raising=False)
    assert resolve_mirror(None) is None
    assert resolve_mirror("") is None
    assert resolve_mirror("some/folder") == "some/folder"
    monkeypatch.setenv(download.ENV_MIRROR, "http://example.invalid/omniglot")
    assert resolve_mirror("some/folder") == "http://example.invalid/omniglot"
    assert resolve_mirror("some/folder", flag="explicit/one") == "explicit/one"  # the flag wins


def test_cli_mirror_flag_wins_over_the_environment(tmp_path: Path, monkeypatch) -> None:
    """`mamlops download --mirror A` with MAMLOPS_DATA_MIRROR=B must use A, as its help says."""
    from typer.testing import CliRunner

    from mamlops.cli import app

    monkeypatch.setenv(download.ENV_MIRROR, str(tmp_path / "from-the-environment"))
    flag = tmp_path / "from-the-flag"
    result = CliRunner().invoke(
        app, ["download", "--mirror", str(flag), "--dest", str(tmp_path / "dest")]
    )
    assert result.exit_code == 1
    assert "from-the-flag" in result.output and "from-the-environment" not in result.output
    assert "Traceback" not in result.output


def test_mirror_sources(monkeypatch) -> None:
    monkeypatch.chdir(MIRROR.parent.parent)  # relative folders resolve against the working dir
    kind, folder = download._source("data/omniglot")
    assert kind == "dir" and Path(folder).is_absolute()
    assert Path(folder).resolve() == MIRROR.resolve()  # another spelling of the same folder
    assert download._source(None) == ("url", download.OFFICIAL_BASE)
    assert download._source("file:///x/y") == ("url", "file:///x/y/")
    with pytest.raises(DataError, match="does not exist"):
        download._source("no/such/folder")
    with pytest.raises(DataError, match="only http"):
        download._source("ftp://example.invalid/")


def test_symlinked_mirror_is_the_same_folder(tmp_path: Path) -> None:
    """A mirror named through a symlink: the source is that folder, whatever the spelling."""
    link = tmp_path / "linked-mirror"
    link.symlink_to(MIRROR, target_is_directory=True)
    kind, folder = download._source(str(link))
    assert kind == "dir"
    assert Path(folder).resolve() == MIRROR.resolve() == link.resolve()
    (tmp_path / "sub").mkdir()
    dotted = f"{tmp_path}/./sub/../{link.name}"  # yet another spelling, relative parts
    assert Path(download._source(dotted)[1]).resolve() == MIRROR.resolve()


def test_pipeline_stage_keeps_verified_copy(
    tmp_path: Path, fetched: tuple[Path, dict], eval_only: None, monkeypatch, capsys
) -> None:
    monkeypatch.delenv(download.ENV_MIRROR, raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(f'data:\n  mirror: "{MIRROR}"\n  miniimagenet_dir: ""\n')
    (tmp_path / "data" / "raw").mkdir(parents=True)
    for name in download.SETS + (download.VERIFIED_NAME,):
        source, target = fetched[0] / name, tmp_path / "data/raw/omniglot" / name
        if source.is_dir():
            shutil.copytree(source, target, copy_function=os.link)
        else:
            shutil.copyfile(source, target)
    download.download_stage(DataConfig.from_params(load_params()), Path("data/raw/omniglot"))
    out = capsys.readouterr().out
    assert "kept (already verified)" in out
    assert "images_evaluation: 659 characters, 13180 images" in out
    assert "miniimagenet: not configured" in out


def test_a_mirror_url_with_a_query_keeps_its_path_and_query(tmp_path: Path, serve) -> None:
    """Issue 25 #10: ``http://host/omniglot?token=...`` fetched ``http://host/images_...zip``
    (urljoin dropped the folder and the token). Now the file is asked for inside the folder,
    with the query."""
    _QuietHandler.requested.clear()
    base = serve(MIRROR.parent) + MIRROR.name + "?token=abc%2Fd"
    kind, folder = download._source(base)
    assert (kind, folder) == ("url", base.replace("?", "/?"))
    zipped = download._fetch_zip(kind, folder, EVAL_ZIP, tmp_path, progress=False)
    assert _QuietHandler.requested == [f"/{MIRROR.name}/{EVAL_ZIP}?token=abc%2Fd"]
    assert zipped.read_bytes() == (MIRROR / EVAL_ZIP).read_bytes()
    assert join("https://h/o/", "a b.zip") == "https://h/o/a%20b.zip"


def test_mirror_credentials_are_sent_as_basic_auth_and_never_shown(tmp_path: Path) -> None:
    """A mirror URL with ``user:TOKEN@`` is fetched with an Authorization header (urllib alone
    would take ``user:TOKEN@host`` for a host name), and no message ever shows the token."""
    import base64

    seen: list[str | None] = []

    class Auth(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            good = "Basic " + base64.b64encode(b"me:s3cr:et").decode()
            body = b"zip bytes" if self.headers.get("Authorization") == good else b""
            self.send_response(200 if body else 401)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Auth)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host = f"127.0.0.1:{server.server_address[1]}"
    try:
        target = tmp_path / "ok.zip"
        download._download(f"http://me:s3cr%3Aet@{host}/a.zip", target, progress=False)
        assert target.read_bytes() == b"zip bytes"
        with pytest.raises(DataError) as bad:
            download._download(f"http://me:WRONGTOKEN@{host}/a.zip", tmp_path / "x", False)
        assert "401" in str(bad.value) and "WRONGTOKEN" not in str(bad.value)
        assert f"http://***@{host}/a.zip" in str(bad.value)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert len(seen) == 2 and all(h and h.startswith("Basic ") for h in seen)
    # an unreachable mirror with credentials: the error names the host, not the token
    with pytest.raises(DataError) as down:
        download._download("http://me:TOPSECRET@127.0.0.1:9/a.zip", tmp_path / "y", False)
    assert "TOPSECRET" not in str(down.value) and "127.0.0.1:9" in str(down.value)
    with pytest.raises(DataError) as scheme:
        download._source("ftp://me:TOPSECRET@host/")
    assert "TOPSECRET" not in str(scheme.value)
    assert redact("https://host/p?q=1") == "https://host/p?q=1"
