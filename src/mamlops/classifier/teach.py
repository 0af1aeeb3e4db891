"""Teaching a classifier from a handful of labelled images, and keeping the ones taught.

What ``POST /classifiers`` runs (``serving/teach.py`` only adds HTTP): the support images, already
decoded and resized by ``preprocess`` exactly as in training, go through ``adapt_classifier``
(the same steps, lr and support-set BatchNorm as ``mamlops adapt``) and the ONNX writer
(``onnx_export.onnx_bytes``).
The classifier is then named by its content: the first 16 hex digits of its ONNX file's SHA-256.
Teaching the same images again gives the same bytes, hence the same id, so a repeated request
finds the classifier it already made instead of storing a copy.

Example (a meta-model from ``dvc repro``, two classes of drawings as ``uint8`` arrays)::

    meta = MetaModel.load("models/omniglot-5w1s/theta_best.safetensors")
    store = ClassifierStore("classifiers")
    taught = teach(meta, {"alpha": alpha_images, "beta": beta_images}, TeachLimits())
    cid, new = store.put(taught)
    store.get(cid).predict_images(["drawing.png"])

A store is a folder with one subfolder per classifier (``<id>/model.onnx``, the support set
as the 28x28 PNGs the network saw, ``<id>/support/<class>-<shot>.png``, and ``<id>/info.json``
for listings). Each is written in a
work folder and renamed into place, so a crash leaves no half classifier; a deleted one is
renamed away before it is removed. Loaded onnxruntime sessions sit in a small LRU cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import threading
import time
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from mamlops.classifier.onnx_metadata import read_metadata
from mamlops.classifier.onnx_predict import OnnxClassifier, OnnxModelError
from mamlops.errors import UserError
from mamlops.files import sweep_abandoned, work_dir

if TYPE_CHECKING:  # adapt imports torch: only teaching needs it, imported there
    from mamlops.classifier.adapt import MetaModel

ID_LENGTH = 16
ID_PATTERN = re.compile(f"^[0-9a-f]{{{ID_LENGTH}}}$")
MAX_LABEL_CHARS = 64
ZIP_MAGIC = b"PK\x03\x04"
INFO = "info.json"  # beside model.onnx: labels, hashes, provenance, support file names


class TeachError(UserError):
    """A support set that cannot be taught, or an unknown classifier. ``status`` is the HTTP
    status the server answers with (400 bad input, 404 unknown id, 413 over a limit)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class TeachLimits:
    """What one teaching request may carry, and how the server spends its CPU on them.

    ``max_shots`` per class (the meta-model was trained on 1 or 5; more still helps a little),
    and at most the meta-model's ways classes (see ``adapt``'s docstring for why not more).
    ``max_teaching`` adaptations run at once, the next one is refused with 429: an
    adaptation takes the machine's cores for tens of milliseconds, and queueing more of them
    only makes every client wait longer. ``cache_size`` onnxruntime sessions stay loaded.
    """

    max_shots: int = 10
    max_teaching: int = 2
    cache_size: int = 32

    def __post_init__(self) -> None:
        for name in ("max_shots", "max_teaching", "cache_size"):
            if getattr(self, name) < 1:
                raise UserError(
                    f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}"
                )


@dataclass(frozen=True)
class Taught:
    """A freshly taught classifier: its ONNX bytes, labels and the support set it saw."""

    onnx: bytes
    labels: list[str]
    support: dict[str, np.ndarray]  # label -> uint8 [K, H, W(, 3)], as the network saw them
    provenance: dict[str, Any]
    meta_model_sha256: str
    seconds: float  # adaptation plus export

    @property
    def id(self) -> str:
        return hashlib.sha256(self.onnx).hexdigest()[:ID_LENGTH]


# ----------------------------------------------------------------------------- the support set


def check_label(label: str) -> str:
    """A class name as given, stripped; refused when empty, too long or unprintable."""
    name = label.strip()
    if not name:
        raise TeachError("a class has no name; give every class a name")
    if len(name) > MAX_LABEL_CHARS:
        raise TeachError(f"class name {name[:20]!r}... is over {MAX_LABEL_CHARS} characters")
    if not name.isprintable():
        raise TeachError(f"class name {name!r} has control characters; use printable text")
    return name


def check_support(shots: dict[str, int], ways: int, limits: TeachLimits) -> None:
    """Refuse, naming the fix, a support set the meta-model cannot be adapted to."""
    if len(shots) < 2:
        raise TeachError(
            f"got {len(shots)} class{'es' if len(shots) != 1 else ''}; a classifier needs at "
            f"least 2 classes (at most {ways}), each with at least one image"
        )
    if len(shots) > ways:
        raise TeachError(
            f"got {len(shots)} classes but this meta-model is {ways}-way: teach at most {ways} "
            f"classes at once, or serve a meta-model trained with more ways",
            413,
        )
    for label, n in shots.items():
        if n == 0:
            raise TeachError(f"class {label!r} has no image; add at least one or remove it")
        if n > limits.max_shots:
            raise TeachError(
                f"class {label!r} has {n} images; at most {limits.max_shots} per class "
                "(the server's --max-shots)",
                413,
            )


def zip_support(data: bytes, max_images: int, max_bytes: int) -> dict[str, list[tuple]]:
    """``{label: [(file name, bytes)]}`` from a zip of class folders (``label/image.png``, or
    the same inside one top folder). Sizes are checked from the zip's directory before
    anything is inflated, so a small zip that unpacks to gigabytes is refused unread."""
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise TeachError(f"not a readable zip file ({exc})") from exc

    def hidden(parts: list[str]) -> bool:
        return any(p.startswith(".") or p == "__MACOSX" for p in parts)

    files = [(i, i.filename.split("/")) for i in infos]
    files = [(i, p) for i, p in files if not hidden(p)]
    tops = {p[0] for _, p in files if len(p) > 2}
    depth = 3 if len(tops) == 1 and all(len(p) == 3 for _, p in files) else 2
    bad = [i.filename for i, p in files if len(p) != depth]
    if bad or not files:
        raise TeachError(
            "the zip must hold one folder per class with the images in it (label/image.png); "
            f"found {bad[:3] if bad else 'no images'}"
        )
    if len(files) > max_images:
        raise TeachError(f"the zip has {len(files)} images; at most {max_images}", 413)
    total = sum(i.file_size for i, _ in files)
    if total > max_bytes:
        raise TeachError(f"the zip unpacks to {total} bytes; at most {max_bytes}", 413)
    out: dict[str, list[tuple]] = {}
    for info, parts in sorted(files, key=lambda f: f[0].filename):
        out.setdefault(parts[-2], []).append((info.filename, zf.read(info)))
    return out


# ----------------------------------------------------------------------------- teaching


def teach(meta: MetaModel, support: dict[str, np.ndarray], limits: TeachLimits) -> Taught:
    """Adapt the meta-model ``meta`` (``adapt.MetaModel``) to ``support`` (label -> uint8
    images as ``preprocess.read_image`` returns them, labels in the order given) and export it.

    Runs with torch's threads as they are: call it off the event loop.
    """
    import torch

    from mamlops.classifier.adapt import adapt_classifier
    from mamlops.classifier.onnx_export import onnx_bytes
    from mamlops.data.preprocess import to_float

    labels = [check_label(label) for label in support]
    if len(set(labels)) < len(labels):
        raise TeachError(f"class names {labels} repeat; give every class its own name")
    images = dict(zip(labels, support.values(), strict=True))
    shots = {label: len(x) for label, x in images.items()}
    check_support(shots, meta.ways, limits)
    start = time.perf_counter()
    xs = to_float(np.concatenate(list(images.values())), meta.dataset)
    ys = torch.tensor([i for i, label in enumerate(labels) for _ in range(shots[label])])
    clf = adapt_classifier(
        meta,
        xs,
        ys,
        labels,
        provenance={
            "support_dir": "POST /classifiers",
            "shots_per_class": shots,
            "balanced_shots": len(set(shots.values())) == 1,
        },
    )
    data = onnx_bytes(clf)
    return Taught(
        data,
        labels,
        images,
        clf.provenance,
        clf.meta_model_sha256,
        time.perf_counter() - start,
    )


# ----------------------------------------------------------------------------- the store


def _png(image: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def _damaged(cid: str, why: str) -> str:
    return f"classifier {cid} is damaged: {why}; DELETE /classifiers/{cid} and teach it again"


class ClassifierStore:
    """Taught classifiers on disk under ``root``, by id; the hot ones loaded in an LRU cache.

    Thread-safe: the server calls it from its thread pool.
    """

    def __init__(self, root: str | Path, cache_size: int = 32) -> None:
        self.root = Path(root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with work_dir(self.root / "incoming"):
                pass
        except OSError as exc:
            raise UserError(
                f"cannot write the classifier store {self.root}: {exc.strerror or exc}; "
                "pass a writable folder with --store"
            ) from None
        sweep_abandoned(self.root / "incoming", ("tmp",))  # a server killed mid-write
        sweep_abandoned(self.root / "deleted", ("old",))
        self.cache_size = cache_size
        self._cache: OrderedDict[str, OnnxClassifier] = OrderedDict()
        # cid -> (stat key, sha256, labels) of its model.onnx: the source of truth info.json caches
        self._facts: dict[str, tuple[tuple[int, int], str, list[str] | None]] = {}
        self._lock = threading.Lock()

    def folder(self, cid: str) -> Path:
        """The folder of classifier ``cid``; 404 for an id that is not one (never a path)."""
        if not ID_PATTERN.match(cid) or not (self.root / cid / "model.onnx").is_file():
            raise self._unknown(cid)
        return self.root / cid

    def ids(self) -> list[str]:
        """Every stored id, the most recently taught first."""
        found = [p for p in self.root.iterdir() if ID_PATTERN.match(p.name)]
        found = [p for p in found if (p / "model.onnx").is_file()]
        created = {p.name: (p / "model.onnx").stat().st_mtime for p in found}
        return sorted(created, key=lambda cid: (-created[cid], cid))

    def put(self, taught: Taught) -> tuple[str, bool]:
        """Store ``taught`` atomically; (id, True) when new, (id, False) when it was there."""
        cid = taught.id
        dest = self.root / cid
        if (dest / "model.onnx").is_file():
            return cid, False
        with work_dir(self.root / "incoming") as tmp:
            (tmp / "support").mkdir()
            names = []
            for i, label in enumerate(taught.labels):
                names.append([f"{i}-{k}.png" for k in range(len(taught.support[label]))])
                for name, image in zip(names[-1], taught.support[label], strict=True):
                    (tmp / "support" / name).write_bytes(_png(image))
            info = {
                "labels": taught.labels,
                "model_sha256": hashlib.sha256(taught.onnx).hexdigest(),
                "meta_model_sha256": taught.meta_model_sha256,
                "provenance": taught.provenance,
                "support": names,
            }
            (tmp / INFO).write_text(json.dumps(info, sort_keys=True, default=str))
            (tmp / "model.onnx").write_bytes(taught.onnx)
            for attempt in range(3):
                try:
                    os.rename(tmp, dest)
                    break
                except OSError:  # another request stored the same classifier first
                    if (dest / "model.onnx").is_file():
                        return cid, False
                    if attempt == 2:  # ... and a DELETE removed it again before the check
                        raise
        return cid, True

    def damage(self, cid: str) -> str | None:
        """Why the stored ``model.onnx`` of ``cid`` is not the classifier stored under that id
        (random bytes, another classifier's graph: its SHA-256 no longer starts with the id),
        or None. Hashed again only when the file's size or time changed."""
        return self._damage(cid, self._model_facts(cid)[0])

    @staticmethod
    def _damage(cid: str, sha: str) -> str | None:
        if sha.startswith(cid):
            return None
        why = f"its model.onnx was changed after it was stored (SHA-256 {sha[:ID_LENGTH]}...)"
        return _damaged(cid, why)

    def _model_facts(self, cid: str) -> tuple[str, list[str] | None]:
        """The SHA-256 of the stored model of ``cid`` and the labels of its metadata (None
        when unreadable), read again only when the file's size or time changed."""
        path = self.folder(cid) / "model.onnx"
        try:
            st = path.stat()
            key = (st.st_mtime_ns, st.st_size)
            if (known := self._facts.get(cid)) is None or known[0] != key:
                data = path.read_bytes()
                try:
                    labels = json.loads(read_metadata(data)["labels"])
                except (ValueError, KeyError):
                    labels = None
                known = key, hashlib.sha256(data).hexdigest(), labels
                self._facts[cid] = known
        except FileNotFoundError:  # deleted by a concurrent request
            raise self._unknown(cid) from None
        return known[1], known[2]

    @staticmethod
    def _unknown(cid: str) -> TeachError:
        return TeachError(f"unknown classifier {cid!r}; GET /classifiers lists them", 404)

    def get(self, cid: str) -> OnnxClassifier:
        """The loaded classifier ``cid`` (from the cache, or loaded into it). The folder is
        checked even on a cache hit: another server on the same store may have deleted it.
        404 when it is gone (also when a concurrent DELETE wins the race with the load), 409
        when its stored model is damaged: never a server error."""
        try:
            folder = self.folder(cid)
        except TeachError:
            with self._lock:
                self._cache.pop(cid, None)
            raise
        with self._lock:
            if cid in self._cache:
                self._cache.move_to_end(cid)
                return self._cache[cid]
        if why := self.damage(cid):
            raise TeachError(why, 409)
        try:
            clf = OnnxClassifier(folder / "model.onnx", intra_op_threads=1)
        except (OnnxModelError, OSError) as exc:  # OSError: deleted while being read
            if not (folder / "model.onnx").is_file():
                raise self._unknown(cid) from None
            why = str(exc).removeprefix(f"{folder / 'model.onnx'}: ")  # no server paths
            raise TeachError(_damaged(cid, f"its model.onnx: {why}"), 409) from None
        with self._lock:
            self._cache[cid] = clf
            self._cache.move_to_end(cid)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return clf

    def info(self, cid: str) -> dict[str, Any]:
        """What a listing shows of ``cid``, from its small ``info.json``: listing a thousand
        classifiers must not load a thousand onnxruntime sessions. Keys: ``labels``,
        ``model_sha256``, ``meta_model_sha256``, ``provenance``, ``support`` (per class, the
        file names of its support images), ``damaged`` (``damage``: why it cannot predict)."""
        sha, labels = self._model_facts(cid)
        damaged = self._damage(cid, sha)
        try:
            info = json.loads((self.folder(cid) / INFO).read_text())
            # a cache of the model's own facts: used only while it agrees with them
            if {"labels", "model_sha256", "provenance", "support"} <= set(info) and (
                damaged or info["labels"] == labels
            ):
                return {**info, "damaged": damaged}
        except (OSError, ValueError):
            pass
        if damaged:  # nothing left to describe it by but its name
            return {"labels": [], "model_sha256": sha, "provenance": {}, "support": [],
                    "damaged": damaged}  # fmt: skip
        # no, a damaged or an edited info.json: the model itself says it all
        clf = self.get(cid)
        names = sorted(p.name for p in (self.folder(cid) / "support").glob("*.png"))
        by_class: list[list[tuple[int, str]]] = [[] for _ in clf.labels]
        for name in names:
            i, _, k = name.removesuffix(".png").partition("-")
            by_class[int(i)].append((int(k), name))
        return {
            "labels": clf.labels,
            "model_sha256": clf.sha256,
            "meta_model_sha256": clf.raw_metadata.get("meta_model_sha256"),
            "provenance": clf.params,
            "support": [[n for _, n in sorted(imgs)] for imgs in by_class],
            "damaged": None,
        }

    def support_png(self, cid: str, name: str) -> bytes:
        if not re.fullmatch(r"\d+-\d+\.png", name):
            raise TeachError(f"no support image {name!r}", 404)
        try:
            return (self.folder(cid) / "support" / name).read_bytes()
        except OSError:  # never there, or deleted by a concurrent request
            raise TeachError(f"no support image {name!r} in classifier {cid}", 404) from None

    def created(self, cid: str) -> float:
        try:
            return (self.folder(cid) / "model.onnx").stat().st_mtime
        except FileNotFoundError:  # deleted by a concurrent request
            raise self._unknown(cid) from None

    def delete(self, cid: str) -> None:
        """Remove ``cid``: renamed out of the store first, so no reader sees half of it."""
        folder = self.folder(cid)
        with self._lock:
            self._cache.pop(cid, None)
            self._facts.pop(cid, None)
        with work_dir(self.root / "deleted", "old") as trash:
            try:
                os.rename(folder, trash / cid)
            except FileNotFoundError:  # deleted by a concurrent request
                raise self._unknown(cid) from None
