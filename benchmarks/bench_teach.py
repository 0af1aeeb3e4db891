"""Teaching over HTTP, measured: time to teach, prediction latency and throughput, memory.

1. ``teach()`` in this process with one torch thread, as the server runs it (adaptation plus
   ONNX export; decoding the uploads is not in it): 5-way 1-shot on the 5-way meta-model and
   20-way 5-shot on a 20-way one, each on fresh random characters of Omniglot's evaluation
   alphabets. Then the same two through a real ``mamlops serve --meta`` process: the whole
   ``POST /classifiers`` round trip (upload, decode, adapt, export, store, answer).
2. ``POST /classifiers/{id}/predict`` with one drawing: sequential latency p50/p99, then
   ``--concurrency`` clients at once (throughput, p50/p99).
3. ``--cycles`` teach/predict cycles (a new 5-way 1-shot classifier each time, then five
   drawings classified by it), the server's RSS read after every cycle: memory must level off
   (taught classifiers stay on disk; at most the cache's 32 sessions stay loaded).

Without ``--meta20`` the 20-way meta-model has random weights (the 5-way one's metadata with
20 ways): the time to adapt does not depend on the weights' values.

    .venv/bin/python benchmarks/bench_teach.py [--meta THETA] [--cycles 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from bench_serving import _rss_mib, mamlops_serve, percentiles

from mamlops.classifier.adapt import MetaModel
from mamlops.classifier.teach import TeachLimits, teach
from mamlops.config import PrepareConfig
from mamlops.data import preprocess
from mamlops.data.splits import decode_class
from mamlops.datasets import omniglot
from mamlops.datasets.omniglot import Character
from mamlops.files import read_safetensors, write_safetensors
from mamlops.meta.model import ConvNetConfig, init_params
from mamlops.params import load_params

ROOT = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("MAMLOPS_DATA_MIRROR", ROOT.parent / "shared/data/omniglot"))


def evaluation_characters() -> list[list[bytes]]:
    """PNG bytes of every drawing of every character in Omniglot's evaluation alphabets (for
    timings: a meta-model may have trained on some of them)."""
    with zipfile.ZipFile(MIRROR / "images_evaluation.zip") as zf:
        by_char: dict[str, list[bytes]] = {}
        for name in sorted(n for n in zf.namelist() if n.endswith(".png")):
            by_char.setdefault(name.rsplit("/", 1)[0], []).append(zf.read(name))
    return list(by_char.values())


def unseen_characters(meta: Path, params: Path = ROOT / "params.yaml") -> list[list[bytes]]:
    """PNG bytes of the upright characters in the *test* split of the class split ``meta`` was
    meta-trained on (its metadata; None: the first of ``prepare.omniglot.splits``): characters
    it never saw, for accuracy claims. Omniglot's evaluation alphabets are not that set: 236 of
    their 659 characters are in Vinyals' training and validation splits."""
    _, metadata = read_safetensors(meta)
    prep = PrepareConfig.from_params(load_params(params)).keys["omniglot"]
    scheme = json.loads(metadata["train_config"]).get("split") or prep.splits[0]
    zips = {s: zipfile.ZipFile(MIRROR / f"{folder}.zip") for s, folder in omniglot.SETS.items()}
    files: dict[Character, list[str]] = {}
    for set_name, zf in zips.items():
        for name in sorted(n for n in zf.namelist() if n.endswith(".png")):
            _, alphabet, character, _ = name.split("/")
            files.setdefault(Character(set_name, alphabet, character), []).append(name)
    characters = sorted(files)  # char_id order: set, alphabet, character
    split = omniglot.split(characters, scheme, prep.split_seed, prep.rotations)
    ids, ks = decode_class(np.asarray(split["test"]), prep.rotations)
    test = sorted({int(c) for c, k in zip(ids, ks, strict=True) if k == 0})
    out = [[zips[characters[c].set].read(n) for n in files[characters[c]]] for c in test]
    for zf in zips.values():
        zf.close()
    return out


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def random_meta_model(like: Path, ways: int, shots: int, out: Path) -> Path:
    """A ``ways``-way meta-model with random weights and ``like``'s other metadata."""
    _, meta = read_safetensors(like)
    train = {**json.loads(meta["train_config"]), "ways": ways, "shots": shots}
    model = {**json.loads(meta["model_config"]), "ways": ways}
    theta = init_params(ConvNetConfig(**model), torch.Generator().manual_seed(0))
    meta = {**meta, "train_config": json.dumps(train), "model_config": json.dumps(model)}
    return write_safetensors(out, theta, meta)


def draw_task(chars: list[list[bytes]], ways: int, shots: int, rng: random.Random) -> list:
    """A task's support set as (label, png) pairs, on ``ways`` random characters."""
    picked = rng.sample(range(len(chars)), ways)
    return [(f"c{c}", png) for c in picked for png in rng.sample(chars[c], shots)]


def summary(seconds: list[float]) -> str:
    ms = np.array(seconds) * 1e3
    return (
        f"median {statistics.median(ms):.1f} ms, p90 {np.percentile(ms, 90):.1f} ms, "
        f"min {ms.min():.1f} ms ({len(ms)} runs)"
    )


def bench_teach_in_process(meta_path: Path, chars, ways: int, shots: int, n: int) -> None:
    meta = MetaModel.load(meta_path)
    rng = random.Random(0)
    times = []
    for i in range(n + 3):
        support: dict[str, list] = {}
        for label, png in draw_task(chars, ways, shots, rng):
            support.setdefault(label, []).append(preprocess.read_image(png, "omniglot"))
        taught = teach(meta, {k: np.stack(v) for k, v in support.items()}, TeachLimits())
        if i >= 3:  # the first calls warm up torch's kernels
            times.append(taught.seconds)
    print(f"teach() {ways}-way {shots}-shot, {meta.steps} steps: {summary(times)}")


def post_task(client: httpx.Client, task: list) -> httpx.Response:
    files = [(label, (f"{i}.png", png, "image/png")) for i, (label, png) in enumerate(task)]
    resp = client.post("/classifiers", files=files)
    resp.raise_for_status()
    return resp


def bench_teach_http(meta_path: Path, chars, ways: int, shots: int, n: int) -> None:
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as store:
        with mamlops_serve("--meta", str(meta_path), "--store", store) as (base, _):
            with httpx.Client(base_url=base, timeout=60) as client:
                times = []
                for i in range(n + 3):
                    task = draw_task(chars, ways, shots, rng)
                    t0 = time.perf_counter()
                    post_task(client, task)
                    if i >= 3:
                        times.append(time.perf_counter() - t0)
    print(f"POST /classifiers {ways}-way {shots}-shot round trip: {summary(times)}")


def bench_server(meta_path: Path, chars, requests: int, concurrency: int, cycles: int) -> None:
    rng = random.Random(2)
    with tempfile.TemporaryDirectory() as store:
        with mamlops_serve("--meta", str(meta_path), "--store", store) as (base, pid):
            with httpx.Client(base_url=base, timeout=60) as client:
                cid = post_task(client, draw_task(chars, 5, 1, rng)).json()["id"]
                drawing = [("files", ("q.png", chars[0][-1], "image/png"))]

                def one(_: int) -> float:
                    t0 = time.perf_counter()
                    client.post(f"/classifiers/{cid}/predict", files=drawing).raise_for_status()
                    return time.perf_counter() - t0

                for i in range(20):
                    one(i)
                p50, p99 = percentiles([one(i) for i in range(requests // 4)])
                print(
                    f"predict, 1 drawing, sequential: p50 {p50:.2f} ms, p99 {p99:.2f} ms "
                    f"({requests // 4} requests)"
                )
                t0 = time.perf_counter()
                with ThreadPoolExecutor(concurrency) as pool:
                    lat = list(pool.map(one, range(requests)))
                wall = time.perf_counter() - t0
                p50, p99 = percentiles(lat)
                print(
                    f"predict, 1 drawing, {concurrency} clients: {requests / wall:,.0f} req/s, "
                    f"p50 {p50:.2f} ms, p99 {p99:.2f} ms ({requests} requests)"
                )

                rss, teach_s = [_rss_mib(pid)], []
                for _ in range(cycles):
                    task = draw_task(chars, 5, 1, rng)
                    t0 = time.perf_counter()
                    cid = post_task(client, task).json()["id"]
                    teach_s.append(time.perf_counter() - t0)
                    queries = [
                        ("files", (f"q{k}.png", chars[int(label[1:])][-1], "image/png"))
                        for k, (label, _) in enumerate(task)
                    ]
                    resp = client.post(f"/classifiers/{cid}/predict", files=queries)
                    resp.raise_for_status()
                    rss.append(_rss_mib(pid))
    marks = [1, cycles // 10, cycles // 2, cycles]
    thirds = [max(rss[1:][k * cycles // 3 : (k + 1) * cycles // 3]) for k in range(3)]
    print(
        f"{cycles} teach/predict cycles: server RSS MiB before {rss[0]:.0f}, "
        + ", ".join(f"after cycle {m} {rss[m]:.0f}" for m in marks)
        + f"; peak per third {', '.join(f'{x:.0f}' for x in thirds)}; "
        f"teach round trip {summary(teach_s)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = ROOT / "models/omniglot-5w1s/theta_best.safetensors"
    ap.add_argument("--meta", type=Path, default=default, help="a 5-way meta-model")
    ap.add_argument("--meta20", type=Path, help="a 20-way meta-model (default: random)")
    ap.add_argument("--n", type=int, default=30, help="timed teachings per setting")
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--cycles", type=int, default=1000)
    args = ap.parse_args()
    if not args.meta.is_file():
        raise SystemExit(f"no meta-model at {args.meta}: run `make run` first, or pass --meta")
    torch.set_num_threads(1)  # as `mamlops serve --meta` does
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores")
    chars = evaluation_characters()
    with tempfile.TemporaryDirectory() as tmp:
        meta20 = args.meta20 or random_meta_model(args.meta, 20, 5, Path(tmp) / "20way.st")
        for path, ways, shots in ((args.meta, 5, 1), (meta20, 20, 5)):
            bench_teach_in_process(path, chars, ways, shots, args.n)
            bench_teach_http(path, chars, ways, shots, args.n)
    bench_server(args.meta, chars, args.requests, args.concurrency, args.cycles)


if __name__ == "__main__":
    main()
