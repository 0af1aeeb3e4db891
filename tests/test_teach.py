"""Teaching over HTTP: real uvicorn on 127.0.0.1, a briefly meta-trained Omniglot model, real
drawings of characters it never saw. A taught classifier predicts like ``mamlops adapt`` +
``predict`` on the same images, survives a restart, and every bad request is a 4xx that leaves
the store as it was; adaptation runs off the event loop and a busy server says 429."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import httpx
import pytest
from conftest import ThreadServer, omniglot_pngs
from PIL import Image

from mamlops.classifier.adapt import adapt_folder, predict_paths
from mamlops.classifier.teach import ClassifierStore, TeachLimits
from mamlops.files import UNLOCKED_GRACE_S, read_safetensors, write_safetensors
from mamlops.serving.serve import create_app

WAYS, SHOTS = 5, 1


@pytest.fixture(scope="module")
def drawings(tmp_path_factory) -> dict:
    """5 evaluation characters: one support drawing and five held-out ones each, as bytes and
    as the support/query folders ``mamlops adapt`` / ``evaluate-folder`` read."""
    pngs = omniglot_pngs(WAYS, 6)
    root = tmp_path_factory.mktemp("drawings")
    labels = [f"char {i}" for i in range(WAYS)]
    for label, imgs in zip(labels, pngs, strict=True):
        for part, chosen in (("support", imgs[:SHOTS]), ("query", imgs[SHOTS:])):
            (root / part / label).mkdir(parents=True)
            for k, data in enumerate(chosen):
                (root / part / label / f"{k}.png").write_bytes(data)
    return {"pngs": pngs, "labels": labels, "root": root}


@pytest.fixture(scope="module")
def server(trained_theta, tmp_path_factory):
    store = tmp_path_factory.mktemp("store")
    app = create_app(meta_path=trained_theta.path, store=store, limits=TeachLimits(max_shots=3))
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        yield {"client": client, "store": store, "url": url}


def support_form(drawings: dict, shots: int = SHOTS) -> list[tuple]:
    return [
        (label, (f"{label}-{k}.png", imgs[k], "image/png"))
        for label, imgs in zip(drawings["labels"], drawings["pngs"], strict=True)
        for k in range(shots)
    ]


def query_files(drawings: dict) -> list[tuple]:
    return [
        ("files", (f"{i}-{k}.png", data, "image/png"))
        for i, imgs in enumerate(drawings["pngs"])
        for k, data in enumerate(imgs[SHOTS:])
    ]


def stored(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir())


def test_teach_predicts_like_adapt_and_predict(server, drawings, trained_theta) -> None:
    """The same adaptation as ``mamlops adapt`` on the same images: the served top labels are
    the CLI's, probabilities agree to float noise, and the id is the ONNX file's hash."""
    client, store = server["client"], server["store"]
    resp = client.post("/classifiers", files=support_form(drawings))
    assert resp.status_code == 201, resp.text
    body = resp.json()
    cid = body["id"]
    onnx_file = store / cid / "model.onnx"
    assert hashlib.sha256(onnx_file.read_bytes()).hexdigest() == body["model_sha256"]
    assert (
        body["model_sha256"].startswith(cid) and resp.headers["location"] == f"/classifiers/{cid}"
    )
    assert body["labels"] == drawings["labels"] and body["new"] is True
    assert body["provenance"]["shots_per_class"] == dict.fromkeys(drawings["labels"], SHOTS)
    assert body["provenance"]["steps"] == trained_theta.cfg.test_inner_steps
    assert 0 < body["teach_ms"] < 60_000
    # the support set as the network saw it: 28x28 grayscale, one per class
    first = client.get(body["support"][0]["images"][0])
    assert first.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(first.content)).size == (28, 28)

    preds = client.post(f"/classifiers/{cid}/predict", files=query_files(drawings)).json()
    served = {p["filename"]: p for p in preds["predictions"]}
    clf = adapt_folder(drawings["root"] / "support", trained_theta.path)
    assert clf.labels == sorted(drawings["labels"]) == body["labels"]
    paths = sorted((drawings["root"] / "query").rglob("*.png"))
    local = predict_paths(clf, paths, top_k=1)
    for path, [(label, prob)] in zip(paths, local, strict=True):
        i = drawings["labels"].index(path.parent.name)
        got = served[f"{i}-{path.stem}.png"]
        assert abs(got["probabilities"][label] - prob) < 1e-4, (path, got, label, prob)
    correct = sum(
        p["label"] == drawings["labels"][int(p["filename"].split("-")[0])]
        for p in preds["predictions"]
    )
    assert correct / len(preds["predictions"]) > 0.4  # 5-way chance is 0.2

    again = client.post("/classifiers", files=support_form(drawings))
    assert again.status_code == 200 and again.json()["id"] == cid and not again.json()["new"]


def test_a_zip_of_class_folders_teaches_too(server, drawings) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for label, imgs in zip(drawings["labels"], drawings["pngs"], strict=True):
            zf.writestr(f"mine/{label}/a.png", imgs[0])
        zf.writestr("mine/.DS_Store", b"junk")
    resp = server["client"].post("/classifiers", files=[("zip", ("s.zip", buf.getvalue()))])
    assert resp.status_code in (200, 201), resp.text
    assert resp.json()["labels"] == sorted(drawings["labels"])


def test_classifiers_survive_a_restart_and_delete(server, drawings, trained_theta) -> None:
    client, store = server["client"], server["store"]
    cid = client.post("/classifiers", files=support_form(drawings, 2)).json()["id"]
    assert cid in [c["id"] for c in client.get("/classifiers").json()["classifiers"]]
    before = client.post(f"/classifiers/{cid}/predict", files=query_files(drawings)).json()

    app = create_app(meta_path=trained_theta.path, store=store)  # a second server, same store
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=60) as other:
        listed = other.get("/classifiers").json()
        assert cid in [c["id"] for c in listed["classifiers"]] and listed["total"] >= 2
        one = other.get("/classifiers", params={"limit": 1, "offset": 1}).json()
        assert len(one["classifiers"]) == 1 and one["classifiers"][0] == listed["classifiers"][1]
        assert other.get(f"/classifiers/{cid}").json()["provenance"]["shots_per_class"] == (
            dict.fromkeys(drawings["labels"], 2)
        )
        assert not app.state.teacher.store._cache  # listing reads info.json, loads no session
        after = other.post(f"/classifiers/{cid}/predict", files=query_files(drawings)).json()
        assert after == before
        assert other.delete(f"/classifiers/{cid}").status_code == 204
        assert other.delete(f"/classifiers/{cid}").status_code == 404
    gone = client.post(f"/classifiers/{cid}/predict", files=query_files(drawings))
    assert gone.status_code == 404 and "unknown classifier" in gone.json()["detail"]
    assert not (store / cid).exists()
    assert not [n for n in stored(store) if n.startswith(".")]  # no work folders left


def _pair(drawings: dict, a: str = "a", b: str = "b") -> list[tuple]:
    pngs = drawings["pngs"]
    return [(a, ("a.png", pngs[0][0], "image/png")), (b, ("b.png", pngs[1][0], "image/png"))]


BAD = [
    # (files, data, status, phrase)
    (lambda d: _pair(d)[:1], None, 400, "at least 2 classes"),
    (
        lambda d: [(f"c{i}", ("x.png", d["pngs"][i % 5][0], "image/png")) for i in range(6)],
        None,
        413,
        "this meta-model is 5-way",
    ),
    (lambda d: _pair(d) + [("a", ("y.png", d["pngs"][0][1]))] * 3, None, 413, "at most 3 per"),
    (lambda d: _pair(d) + [("b", ("notes.txt", b"hello", "text/plain"))], None, 400, "notes.txt"),
    (
        lambda d: [(f"c{i % 5}", ("x.png", d["pngs"][0][0])) for i in range(16)],
        None,
        413,
        "at most 15",
    ),
    (
        lambda d: [(f"c{i % 5}", ("x.png", d["pngs"][0][0])) for i in range(40)],
        None,
        413,
        "at most 15",
    ),
    (lambda d: _pair(d, "a", " a "), None, 400, "repeat"),
    (lambda d: _pair(d, "a", " "), None, 400, "has no name"),
    (lambda d: _pair(d, "a", "x" * 65), None, 400, "over 64 characters"),
    (lambda d: _pair(d), {"note": "hi"}, 400, "carry text"),
    (lambda d: [("z", ("s.zip", b"PK\x03\x04garbage"))], None, 400, "not a readable zip"),
]


@pytest.mark.parametrize(("files", "data", "status", "phrase"), BAD)
def test_bad_teaching_requests_are_4xx_and_store_nothing(
    server, drawings, files, data, status, phrase
) -> None:
    client, store = server["client"], server["store"]
    before = stored(store)
    resp = client.post("/classifiers", files=files(drawings), data=data)
    assert resp.status_code == status, resp.text
    assert phrase in resp.json()["detail"]
    assert stored(store) == before


def test_zip_bombs_and_bad_layouts_are_refused_unread(server) -> None:
    client = server["client"]
    flat = io.BytesIO()
    with zipfile.ZipFile(flat, "w") as zf:
        zf.writestr("a.png", b"x")
    resp = client.post("/classifiers", files=[("z", ("s.zip", flat.getvalue()))])
    assert resp.status_code == 400 and "one folder per class" in resp.json()["detail"]
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/x.png", b"\0" * (12 * 1024 * 1024))  # 12 MB of zeros: a 12 KB zip
        zf.writestr("b/y.png", b"\0")
    assert len(bomb.getvalue()) < 100_000
    resp = client.post("/classifiers", files=[("z", ("s.zip", bomb.getvalue()))])
    assert resp.status_code == 413 and "unpacks to" in resp.json()["detail"]


@pytest.mark.parametrize(
    ("method", "path", "status", "phrase"),
    [
        ("GET", "/classifiers/0123456789abcdef", 404, "unknown classifier"),
        ("GET", "/classifiers/..%2F..%2Fetc", 404, ""),  # the router's own 404
        ("GET", "/classifiers/ABCDEF0123456789", 404, "unknown classifier"),
        ("DELETE", "/classifiers/not-an-id", 404, "unknown classifier"),
        ("GET", "/classifiers/0123456789abcdef/support/0-0.png", 404, "unknown classifier"),
        ("POST", "/classifiers/0123456789abcdef/predict", 404, "unknown classifier"),
    ],
)
def test_unknown_ids_are_404(server, drawings, method, path, status, phrase) -> None:
    files = query_files(drawings)[:1] if method == "POST" else None
    resp = server["client"].request(method, path, files=files)
    assert resp.status_code == status and phrase in resp.json()["detail"]


def test_not_multipart_and_empty_bodies(server) -> None:
    client = server["client"]
    resp = client.post("/classifiers", json={"a": 1})
    assert resp.status_code == 415 and "multipart/form-data" in resp.json()["detail"]
    resp = client.post(
        "/classifiers", content=b"", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    # the teaching form, not the predict routes' 'files' field (issue 25)
    assert resp.status_code == 400 and "one form field per class" in resp.json()["detail"]
    assert "'files'" not in resp.json()["detail"]
    texts = {f"t{i}": "x" for i in range(5000)}
    many = client.post("/classifiers", data=texts, files=[("a", ("a.png", b"x", "image/png"))])
    assert many.status_code == 413 and "text fields" in many.json()["detail"], many.text
    assert "images" not in many.json()["detail"].split(";")[0]  # it said "over 50 images"


def test_a_server_without_meta_model_says_how_to_teach(tmp_path, drawings) -> None:
    from conftest import build_classifier

    from mamlops.classifier.onnx_export import export_onnx

    export_onnx(build_classifier()[0], tmp_path / "fixed.onnx")
    with ThreadServer(create_app(tmp_path / "fixed.onnx")) as url:
        assert httpx.get(f"{url}/health").json()["teaching"] is False
        resp = httpx.post(f"{url}/classifiers", files=_pair(drawings))
        assert resp.status_code == 404 and "--meta" in resp.json()["detail"]
        assert httpx.get(f"{url}/meta-model").status_code == 404


def slow_meta_model(theta: Path, folder: Path, steps: int) -> Path:
    """The same theta with ``steps`` test-time inner steps: a teach that takes a while."""
    tensors, meta = read_safetensors(theta)
    config = json.loads(meta["train_config"])
    meta["train_config"] = json.dumps({**config, "test_inner_steps": steps}, sort_keys=True)
    return write_safetensors(folder / "slow.safetensors", tensors, meta)


def test_teaching_runs_off_the_event_loop_and_a_busy_server_says_429(
    trained_theta, drawings, tmp_path
) -> None:
    """While a (slow) adaptation runs, /health and another classifier's predictions answer at
    once, and a second adaptation beyond --max-teaching is refused with Retry-After."""
    fast = create_app(meta_path=trained_theta.path, store=tmp_path / "store")
    with ThreadServer(fast) as url:
        cid = httpx.post(f"{url}/classifiers", files=_pair(drawings), timeout=60).json()["id"]
    slow = slow_meta_model(trained_theta.path, tmp_path, 400)
    app = create_app(meta_path=slow, store=tmp_path / "store", limits=TeachLimits(max_teaching=1))
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        result: dict = {}
        teacher = threading.Thread(
            target=lambda: result.update(r=client.post("/classifiers", files=_pair(drawings)))
        )
        start = time.monotonic()
        teacher.start()
        time.sleep(0.3)  # the adaptation has started (400 steps take seconds)
        health_s = []
        for _ in range(5):
            t = time.monotonic()
            assert client.get("/health").status_code == 200
            health_s.append(time.monotonic() - t)
        pred = client.post(f"/classifiers/{cid}/predict", files=query_files(drawings)[:2])
        assert pred.status_code == 200
        busy = client.post("/classifiers", files=_pair(drawings, "c", "d"))
        still_teaching = teacher.is_alive()
        teacher.join()
        taught_s = time.monotonic() - start
    assert still_teaching, f"the slow adaptation ended too soon ({taught_s:.1f} s) to test"
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert "--max-teaching" in busy.json()["detail"]
    assert max(health_s) < min(0.5, taught_s / 4), (health_s, taught_s)
    assert result["r"].status_code == 201, result["r"].text


def test_store_sweeps_killed_writes_and_bounds_its_cache(server, drawings, tmp_path) -> None:
    """A work folder of a dead process (a server killed mid-write) is removed when a store
    opens; sessions beyond cache_size are dropped, not leaked, and reload on demand."""
    store_dir = server["store"]
    for a, b in (("x", "y"), ("p", "q"), ("u", "v")):
        assert server["client"].post("/classifiers", files=_pair(drawings, a, b)).status_code == 201
    dead = store_dir / f".incoming-tmp-{socket.gethostname()}-999999999-abc"
    (dead / "support").mkdir(parents=True)
    (store_dir / "0123456789abcdef").mkdir()  # an id folder without model.onnx: not listed
    store = ClassifierStore(store_dir, cache_size=2)
    assert not [n for n in stored(store_dir) if n.startswith(".incoming")]
    ids = store.ids()
    assert "0123456789abcdef" not in ids and len(ids) >= 3
    for cid in ids:
        store.get(cid)
    assert len(store._cache) == min(2, len(ids))
    assert store.get(ids[0]).labels  # evicted earlier, loaded again
    # a damaged info.json: the listing falls back to the model's own metadata
    want = store.info(ids[0])
    (store_dir / ids[0] / "info.json").write_text("{not json")
    assert store.info(ids[0]) == want
    (store_dir / "0123456789abcdef").rmdir()


def test_a_restarted_server_sweeps_what_a_killed_one_left(trained_theta, tmp_path) -> None:
    """A server killed while storing a classifier leaves its work folder in store/incoming.
    Restarted in a container, the server often has the killed one's pid (1) and a new host
    name, and names alone kept such folders forever; the writer's lock tells: the folders of
    killed writers go when the server starts, whatever their names, a live writer's stays."""
    store = tmp_path / "store"
    writer = (
        "import sys, time; from mamlops.files import work_dir\n"
        "with work_dir(sys.argv[1]) as w:\n"
        "    (w / 'model.onnx').write_bytes(b'half'); print(w, flush=True); time.sleep(60)\n"
    )
    command = [sys.executable, "-c", writer, str(store / "incoming")]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    try:
        folders = [Path(p.stdout.readline().strip()) for p in procs]
        for proc in procs[:2]:
            proc.kill()
            proc.wait()
        host, old = socket.gethostname(), time.time() - 2 * UNLOCKED_GRACE_S
        owners = [f"{host}-{os.getpid()}", "old-container-1f3a-1", "node-b-7"]
        moved = []
        for proc, folder, owner in zip(procs, folders, owners, strict=True):
            moved.append(folder.rename(str(folder).replace(f"-{host}-{proc.pid}-", f"-{owner}-")))
            os.utime(moved[-1], (old, old))
        app = create_app(meta_path=trained_theta.path, store=store)
        with ThreadServer(app) as url:
            assert httpx.get(f"{url}/health", timeout=30).status_code == 200
            assert [p.exists() for p in moved] == [False, False, True]
    finally:
        procs[2].kill()
        procs[2].wait()
    ClassifierStore(store)  # the next start, once that writer is gone too
    assert not [n for n in stored(store) if n.startswith(".incoming")]


def test_openapi_describes_teaching(server) -> None:
    spec = server["client"].get("/openapi.json").json()
    body = spec["paths"]["/classifiers"]["post"]["requestBody"]["content"]
    items = body["multipart/form-data"]["schema"]["additionalProperties"]["items"]
    assert items["format"] == "binary"
    assert {"201", "429", "413"} <= set(spec["paths"]["/classifiers"]["post"]["responses"])
    assert "/classifiers/{cid}/predict" in spec["paths"]


def test_a_classifier_gone_or_damaged_is_never_a_5xx(trained_theta, drawings, tmp_path) -> None:
    """Issue 25 #1, #2: a predict on a classifier deleted meanwhile, or whose stored model.onnx
    is random bytes or another classifier's graph, answered a plain-text 500 while the listing
    showed it healthy; a teach whose classifier was deleted before its answer answered 404. Now:
    404 for one gone, 409 naming the damage (and the listing marks it), the teach answers with
    what it stored; and a storm of concurrent teach/predict/delete on one id has no 5xx."""
    app = create_app(meta_path=trained_theta.path, store=tmp_path / "store")
    store = app.state.teacher.store
    with ThreadServer(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        ids = [client.post("/classifiers", files=_pair(drawings, a, b)).json()["id"]
               for a, b in (("r1", "r2"), ("f1", "f2"), ("g1", "g2"))]  # fmt: skip
        rand, foreign, donor = ids
        (tmp_path / "store" / rand / "model.onnx").write_bytes(os.urandom(4000))
        shutil.copy(tmp_path / "store" / donor / "model.onnx", tmp_path / "store" / foreign)
        for cid in (rand, foreign):  # never loaded before: as after a restart
            answer = client.post(f"/classifiers/{cid}/predict", files=query_files(drawings))
            assert answer.status_code == 409, answer.text
            assert f"classifier {cid} is damaged" in answer.json()["detail"]
            assert "teach it again" in answer.json()["detail"]
            assert "damaged" in client.get(f"/classifiers/{cid}").json()["damaged"]
        listed = {c["id"]: c["damaged"] for c in client.get("/classifiers").json()["classifiers"]}
        assert listed[donor] is None and listed[rand] and listed[foreign]
        ok = client.post(f"/classifiers/{donor}/predict", files=query_files(drawings))
        assert ok.status_code == 200

        # a DELETE between the store's check and its load of the model: 404, not 500
        real_folder = store.folder

        def deleted_after_the_check(cid: str) -> Path:
            folder = real_folder(cid)
            store.folder = real_folder  # once
            (folder / "model.onnx").unlink()
            return folder

        store.folder = deleted_after_the_check
        store._cache.clear()  # not loaded yet, as after a restart
        gone = client.post(f"/classifiers/{donor}/predict", files=query_files(drawings))
        assert gone.status_code == 404 and "unknown classifier" in gone.json()["detail"]

        # a DELETE between storing a teaching and answering it: the answer is what it stored
        real_put = store.put

        def put_then_deleted(taught):
            out = real_put(taught)
            store.put = real_put  # once
            store.delete(out[0])
            return out

        store.put = put_then_deleted
        taught = client.post("/classifiers", files=_pair(drawings, "t1", "t2"))
        assert taught.status_code == 201, taught.text
        assert client.get(f"/classifiers/{taught.json()['id']}").status_code == 200

        # the storm of the probe: two teach, two predict and two delete loops on one id
        form, statuses, stop = _pair(drawings, "s1", "s2"), [], time.monotonic() + 2.0

        def loop(method: str, path: str, **kw) -> None:
            with httpx.Client(base_url=url, timeout=60) as c:
                while time.monotonic() < stop:
                    try:
                        statuses.append((method, c.request(method, path, **kw).status_code))
                    except httpx.TransportError as exc:  # a server error without an answer
                        statuses.append((method, repr(exc)))

        sid = client.post("/classifiers", files=form).json()["id"]
        jobs = [("POST", "/classifiers", {"files": form})] * 2
        jobs += [("POST", f"/classifiers/{sid}/predict", {"files": query_files(drawings)})] * 2
        jobs += [("DELETE", f"/classifiers/{sid}", {})] * 2
        threads = [threading.Thread(target=loop, args=(m, p), kwargs=kw) for m, p, kw in jobs]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    allowed = {"POST": {200, 201, 404, 429}, "DELETE": {204, 404}}
    assert statuses, "the storm never ran"
    assert all(code in allowed[m] for m, code in statuses), sorted(set(statuses), key=str)


def test_info_json_is_a_cache_checked_against_the_model(server, drawings) -> None:
    """Issue 25: a hand-edited info.json changed the labels GET showed while predict used the
    model's own. The model's metadata is the truth: an info.json that disagrees is passed
    over. The metadata is read from the file's bytes as onnxruntime reads it."""
    import random

    from mamlops.classifier.onnx_metadata import read_metadata
    from mamlops.classifier.onnx_predict import OnnxClassifier

    client, store = server["client"], server["store"]
    cid = client.post("/classifiers", files=_pair(drawings, "h1", "h2")).json()["id"]
    model = store / cid / "model.onnx"
    assert read_metadata(model.read_bytes()) == OnnxClassifier(model).raw_metadata
    info = json.loads((store / cid / "info.json").read_text())
    (store / cid / "info.json").write_text(json.dumps({**info, "labels": ["X", "Y"]}))
    assert client.get(f"/classifiers/{cid}").json()["labels"] == ["h1", "h2"]
    listed = {c["id"]: c["labels"] for c in client.get("/classifiers").json()["classifiers"]}
    assert listed[cid] == ["h1", "h2"]
    predicted = client.post(f"/classifiers/{cid}/predict", files=query_files(drawings)).json()
    assert {p["label"] for p in predicted["predictions"]} <= {"h1", "h2"}
    for junk in (random.Random(0).randbytes(4000), model.read_bytes()[:-100], b"\x08"):
        with pytest.raises(ValueError, match="not an ONNX model"):
            read_metadata(junk)
