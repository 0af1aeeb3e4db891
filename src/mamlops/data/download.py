"""The ``download`` stage: fetch Omniglot, check it by content, move it into place atomically.

Why content and not zip checksums: mirrors rebuild the zip containers, so their bytes differ from
the official release while the PNG files inside are byte-identical. The project therefore records,
in ``resources/omniglot.json``, the expected character folders and a fingerprint of the PNGs
(sha256 over the sorted relative paths and each file's sha256), and trusts nothing else.

Why atomic: later stages read ``data/raw/omniglot`` and DVC caches it. A half-extracted or
unverified tree must never sit at that path, and a failed re-download must not destroy an earlier
good copy. Everything is built in a temporary folder beside the destination (same filesystem, so
the final ``rename`` is atomic) and swapped in only after it verified.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import shutil
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from mamlops import datasets
from mamlops.config import DataConfig
from mamlops.errors import DataError
from mamlops.files import sweep_abandoned, work_dir
from mamlops.urls import join, redact, request

OFFICIAL_BASE = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/"
ENV_MIRROR = "MAMLOPS_DATA_MIRROR"
SETS = ("images_background", "images_evaluation")
RECORD_PATH = Path(__file__).parents[1] / "resources" / "omniglot.json"
VERIFIED_NAME = "VERIFIED.json"
FIX = f"re-download (force) or point {ENV_MIRROR} at a good copy"
_CHUNK = 1 << 16
_SHOWN = 5  # how many offending names an error message lists before giving a count


# --- where the data comes from ---------------------------------------------------------------


def resolve_mirror(params_mirror: str | None, flag: str | None = None) -> str | None:
    """The mirror to use: an explicit ``flag`` (``mamlops download --mirror``) wins, then
    ``$MAMLOPS_DATA_MIRROR``, then params.yaml's ``data.mirror``; none of them: the release.

    The environment variable wins over params.yaml so that a machine without internet (CI, an
    air-gapped cluster) can redirect the stage without editing params.yaml, which DVC tracks.
    """
    for value in (flag, os.environ.get(ENV_MIRROR), params_mirror):
        if value and value.strip():
            return value.strip()
    return None


def _source(mirror: str | None) -> tuple[str, str]:
    """``("url", base)`` or ``("dir", absolute folder)`` for a mirror; ``None`` is the release."""
    if mirror is None:
        return "url", OFFICIAL_BASE
    scheme = urllib.parse.urlsplit(mirror).scheme.lower()
    if scheme in ("http", "https", "file"):
        return "url", join(mirror, "")  # the folder, its query kept (urls.join)
    if "://" in mirror:
        raise DataError(f"mirror {redact(mirror)!r}: only http, https and file URLs are supported")
    # A relative folder is taken relative to the working dir (the repo root for DVC stages).
    folder = Path(mirror).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"mirror folder {folder} does not exist; fix data.mirror or {ENV_MIRROR}")
    return "dir", str(folder)


def _download(url: str, target: Path, progress: bool) -> None:
    """Stream ``url`` to ``target`` in chunks, with a rich progress bar; refuse short reads.

    A short read (connection dropped) would otherwise surface later as a confusing bad-zip error,
    so the byte count is checked against Content-Length here and named as a download problem.
    """
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    name = PurePosixPath(urllib.parse.urlsplit(url).path).name
    shown = redact(url)
    try:
        response = urllib.request.urlopen(request(url), timeout=60)  # scheme checked in _source
    except (OSError, http.client.HTTPException, ValueError) as exc:  # URLError is an OSError
        raise DataError(f"{shown}: download failed ({redact(str(exc))}); {FIX}") from exc
    with response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            disable=not progress,
        )
        received = 0
        with bar, target.open("wb") as out:
            task = bar.add_task(f"download {name}", total=total)
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    received += len(chunk)
                    bar.advance(task, len(chunk))
            except (OSError, http.client.HTTPException) as exc:
                raise DataError(f"{shown}: download interrupted ({exc}); {FIX}") from exc
    if total is not None and received != total:
        raise DataError(f"{shown}: got {received} of {total} bytes (truncated download); {FIX}")


def _fetch_zip(kind: str, base: str, name: str, workdir: Path, progress: bool) -> Path:
    """The zip for one set as a local file: read in place from a folder, else downloaded."""
    if kind == "dir":
        path = Path(base) / name
        if not path.is_file():
            raise DataError(f"{path}: not found in the mirror folder; {FIX}")
        return path
    target = workdir / name
    _download(join(base, name), target, progress)
    return target


def _open_zip(path: Path) -> zipfile.ZipFile:
    """Open a zip, turning a truncated or corrupt container into a DataError that names it."""
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"{path}: not a readable zip ({exc}); truncated or corrupt? {FIX}") from exc


def _extract(archive: zipfile.ZipFile, set_name: str, into: Path) -> None:
    """Extract the set's PNGs only, refusing paths that escape ``into``.

    Other members (``__MACOSX/``, ``.DS_Store``) are dropped so that the tree holds exactly what
    the fingerprint covers. A CRC error while reading means a damaged zip and is named as such.
    """
    source = archive.filename
    for info in archive.infolist():
        member = PurePosixPath(info.filename)
        if info.is_dir() or member.parts[:1] != (set_name,) or member.suffix.lower() != ".png":
            continue
        if ".." in member.parts or member.is_absolute():
            raise DataError(f"{source}: member {info.filename!r} escapes the folder; {FIX}")
        target = into.joinpath(*member.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with archive.open(info) as src, target.open("wb") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DataError(f"{source}: member {info.filename} is damaged ({exc}); {FIX}") from exc


# --- what the data must be -------------------------------------------------------------------


def load_record() -> dict[str, Any]:
    """The project's recorded expectations (characters, counts, fingerprints) per set."""
    return json.loads(RECORD_PATH.read_text())


def _listing(names: Iterable[str], more: int = 0) -> str:
    """``a, b, c (and 12 more)`` for error messages that must stay short but concrete."""
    names = list(names)
    shown = ", ".join(names[:_SHOWN])
    rest = len(names) - _SHOWN + more
    return f"{shown} (and {rest} more)" if rest > 0 else shown


def _characters(set_dir: Path) -> list[str]:
    """``Alphabet/characterNN`` for every character folder present, sorted."""
    return sorted(
        f"{alphabet.name}/{char.name}"
        for alphabet in set_dir.iterdir()
        if alphabet.is_dir()
        for char in alphabet.iterdir()
        if char.is_dir()
    )


def _check_structure(root: Path, set_name: str, expected: dict[str, Any]) -> list[Path]:
    """Folders and counts against the record; returns the PNGs in fingerprint order.

    Runs before any hashing so that a missing folder is reported at once, by name.
    """
    set_dir = root / set_name
    if not set_dir.is_dir():
        raise DataError(f"{set_dir}: folder missing; {FIX}")
    present = set(_characters(set_dir))
    wanted = expected["characters"]
    missing = [c for c in wanted if c not in present]
    if missing:
        raise DataError(
            f"{set_dir}: {len(missing)} character folder(s) missing: {_listing(missing)}; {FIX}"
        )
    extra = sorted(present - set(wanted))
    if extra:
        raise DataError(f"{set_dir}: unexpected character folder(s): {_listing(extra)}; {FIX}")
    per_char = expected["images_per_character"]
    files: list[Path] = []
    for char in wanted:
        char_dir = set_dir / char
        entries = sorted(char_dir.iterdir())
        pngs = [p for p in entries if p.is_file() and p.suffix == ".png"]
        others = [p.name for p in entries if p not in pngs]
        if others:
            raise DataError(f"{char_dir}: unexpected entries {_listing(others)}; {FIX}")
        if len(pngs) != per_char:
            raise DataError(f"{char_dir}: {len(pngs)} PNGs, expected {per_char}; {FIX}")
        files.extend(pngs)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _file_digest(path: Path, decode: bool) -> str:
    """sha256 of one PNG; with ``decode`` it must also decode fully (not just parse headers)."""
    data = path.read_bytes()
    if decode:
        try:
            with Image.open(path) as image:
                image.load()
        except Exception as exc:  # PIL raises many types for damaged images
            raise DataError(f"{path}: PNG does not decode ({exc}); {FIX}") from exc
    return hashlib.sha256(data).hexdigest()


def fingerprint(root: Path, files: Iterable[Path], decode: bool = True) -> str:
    """sha256 over ``"<relative posix path>\\0<file sha256>\\n"`` for the files in sorted order.

    Paths are part of the fingerprint so that a renamed or moved character also changes it.
    """
    digest = hashlib.sha256()
    for path in files:
        rel = path.relative_to(root).as_posix()
        digest.update(f"{rel}\0{_file_digest(path, decode)}\n".encode())
    return digest.hexdigest()


def _verify_sets(root: Path, decode: bool) -> dict[str, Any]:
    """Structure of every set first (cheap, names folders), then content and fingerprints."""
    record = load_record()["sets"]
    files = {name: _check_structure(root, name, record[name]) for name in SETS}
    summary: dict[str, Any] = {"fingerprints": {}, "counts": {}}
    for name in SETS:
        got = fingerprint(root, files[name], decode=decode)
        if got != record[name]["fingerprint"]:
            raise DataError(
                f"{root / name}: content fingerprint {got[:16]}... does not match the recorded "
                f"{record[name]['fingerprint'][:16]}... (some PNG differs from the release); {FIX}"
            )
        summary["fingerprints"][name] = got
        summary["counts"][name] = {
            "characters": len(record[name]["characters"]),
            "images": len(files[name]),
        }
    return summary


def verify_omniglot(root: Path) -> dict[str, Any]:
    """Full check of an Omniglot tree: folders, 20 PNGs per character, decoding, fingerprints.

    Returns ``{"root", "fingerprints", "counts"}``; raises DataError naming the first problem.
    """
    root = Path(root)
    return {"root": str(root), **_verify_sets(root, decode=True)}


def _already_verified(dest: Path) -> dict[str, Any] | None:
    """The stored summary when ``dest`` holds a verified copy that still matches, else None.

    The quick re-check hashes every file but skips decoding: files whose fingerprint equals the
    recorded one are byte-identical to the release, which is known to decode.
    """
    marker = dest / VERIFIED_NAME
    if not marker.is_file():
        return None
    try:
        stored = json.loads(marker.read_text())
        current = _verify_sets(dest, decode=False)
    except (DataError, ValueError, OSError):
        return None
    recorded = stored.get("fingerprints") or {}
    if any(recorded.get(name) != fp for name, fp in current["fingerprints"].items()):
        return None
    return {**stored, "skipped": True}


# --- the stage -------------------------------------------------------------------------------


def _swap_in(staged: Path, dest: Path, workdir: Path) -> None:
    """Rename the verified tree into place; an earlier copy is moved aside, then removed."""
    if dest.exists():
        old = workdir / "previous"
        dest.rename(old)
        try:
            staged.rename(dest)
        except OSError:
            old.rename(dest)  # put the earlier good copy back
            raise
    else:
        staged.rename(dest)


def fetch_omniglot(
    dest: Path, mirror: str | None = None, *, force: bool = False, progress: bool = True
) -> dict[str, Any]:
    """Fetch, extract, verify and atomically install Omniglot at ``dest``.

    ``mirror`` is a local folder or an http/https/file URL base holding ``images_background.zip``
    and ``images_evaluation.zip``; ``None`` uses the official GitHub release. When ``dest`` already
    holds a verified copy with the recorded fingerprints it is re-checked and kept (unless
    ``force``). Returns ``{"fingerprints", "counts", "skipped"}``, and ``"source"`` (the zips'
    URL base or folder) when it downloaded.
    """
    dest = Path(dest).absolute()
    if not force:
        kept = _already_verified(dest)
        if kept is not None:
            return kept
    kind, base = _source(mirror)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sweep_abandoned(dest)
    with work_dir(dest) as workdir:
        # Fetch and open both zips before extracting so a bad container fails fast.
        archives = [
            _open_zip(_fetch_zip(kind, base, f"{name}.zip", workdir, progress)) for name in SETS
        ]
        staged = workdir / "staged"
        staged.mkdir()
        try:
            for name, archive in zip(SETS, archives, strict=True):
                _extract(archive, name, staged)
        finally:
            for archive in archives:
                archive.close()
        summary = verify_omniglot(staged)
        summary.pop("root")
        # The marker goes in last: its presence means the tree beside it passed verification.
        # It says what the data is, not where it came from, so the tracked output (and its DVC
        # hash) is the same from any mirror or the official release.
        (staged / VERIFIED_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        _swap_in(staged, dest, workdir)
    return {"source": redact(base), **summary, "skipped": False}


def download_stage(data: DataConfig, dest: Path) -> dict[str, Any]:
    """The stage ``download``: Omniglot into ``dest`` (kept when already verified), and a check
    of each source the stage does not download (the user's miniImageNet folder, when one is
    configured; its data set module says how). Prints a summary."""
    summary = fetch_omniglot(dest, resolve_mirror(data.mirror))
    if summary["skipped"]:
        print(f"omniglot: kept (already verified) at {dest}")
    else:
        print(f"omniglot: downloaded and verified at {dest} from {summary['source']}")
    for name, counts in summary["counts"].items():
        print(
            f"  {name}: {counts['characters']} characters, {counts['images']} images, "
            f"fingerprint {summary['fingerprints'][name][:16]}"
        )
    for dataset in datasets.DATASETS.values():
        line = dataset.describe_source(data)
        if line is not None:
            print(line)
    return summary
