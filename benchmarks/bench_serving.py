"""Serving speed: onnxruntime vs PyTorch eager on the same inputs, then HTTP under load.

Measures single-image latency (p50/p99), batch throughput, and a real ``mamlops serve`` process
under bounded load from concurrent clients on 127.0.0.1 (p50/p99, requests/s, and the server's
RSS sampled across the run; the server is stopped at the end).
Without ``--classifier`` it uses a random-weight Omniglot-shaped classifier: speed does not
depend on the weights' values.

    .venv/bin/python benchmarks/bench_serving.py [--classifier X.safetensors] [--requests 400]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from mamlops.classifier.classifier import Classifier
from mamlops.classifier.onnx_export import export_onnx
from mamlops.classifier.onnx_predict import OnnxClassifier
from mamlops.meta.model import ConvNetConfig, batch_stats, init_params


def random_classifier(dataset: str, ways: int) -> Classifier:
    cfg = ConvNetConfig.for_dataset(dataset, ways)
    gen = torch.Generator().manual_seed(0)
    params = init_params(cfg, gen)
    support = torch.rand(ways, cfg.in_channels, cfg.image_size, cfg.image_size, generator=gen)
    labels = [f"class{i}" for i in range(ways)]
    stats = batch_stats(params, support, cfg)
    return Classifier(params, stats, cfg, labels, dataset, "0" * 64, {"bench": True})


def percentiles(samples: list[float]) -> tuple[float, float]:
    arr = np.array(samples) * 1e3
    return float(np.percentile(arr, 50)), float(np.percentile(arr, 99))


def time_calls(fn, n: int, warmup: int = 10) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench_engines(clf: Classifier, onx: OnnxClassifier, n: int, batch: int) -> None:
    cfg = clf.model_cfg
    one = torch.rand(1, cfg.in_channels, cfg.image_size, cfg.image_size)
    many = torch.rand(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    one_np, many_np = one.numpy(), many.numpy()
    np.testing.assert_allclose(onx.predict_array(many_np), clf.predict_proba(many).numpy(), 1e-4)

    ort1 = percentiles(time_calls(lambda: onx.predict_array(one_np), n))
    pt1 = percentiles(time_calls(lambda: clf.predict_proba(one), n))
    print(f"single image  onnxruntime p50 {ort1[0]:.3f} ms p99 {ort1[1]:.3f} ms")
    print(f"single image  torch eager p50 {pt1[0]:.3f} ms p99 {pt1[1]:.3f} ms")
    print(f"  ratio torch/ort p50 {pt1[0] / ort1[0]:.2f}x  p99 {pt1[1] / ort1[1]:.2f}x")

    reps = max(5, n // 10)
    ort_b = statistics.median(time_calls(lambda: onx.predict_array(many_np), reps, 3))
    pt_b = statistics.median(time_calls(lambda: clf.predict_proba(many), reps, 3))
    print(
        f"batch {batch}     onnxruntime {batch / ort_b:,.0f} img/s  torch {batch / pt_b:,.0f} img/s"
    )
    print(f"  ratio ort/torch throughput {pt_b / ort_b:.2f}x")


def _rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` now (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _png(side: int, seed: int) -> bytes:
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side), np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@contextlib.contextmanager
def mamlops_serve(*args: str) -> Iterator[tuple[str, int]]:
    """``mamlops serve ARGS`` as its own process on a free 127.0.0.1 port: yields (base URL,
    pid) once /health answers, and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mamlops = Path(sys.executable).parent / "mamlops"
    server = subprocess.Popen(
        [str(mamlops), "serve", *args, "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit(f"mamlops serve {' '.join(args)} did not start")
            time.sleep(0.1)
        yield base, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)


def bench_http(model_path: Path, requests: int, concurrency: int, big_every: int) -> None:
    """Bounded loopback load on a real ``mamlops serve`` process: ``requests`` POST /predict
    from ``concurrency`` clients (every ``big_every``-th request carries four 1024x1024 PNGs,
    the rest one 105x105 drawing), latency p50/p99, and the server's RSS sampled every 50 ms."""
    small = [("files", ("x.png", _png(105, 0), "image/png"))]
    big = [("files", (f"b{i}.png", _png(1024, i), "image/png")) for i in range(4)]
    rss: list[float] = []
    done = threading.Event()

    with mamlops_serve(str(model_path)) as (base, pid), httpx.Client(timeout=60) as client:

        def sample() -> None:
            while not done.is_set():
                rss.append(_rss_mib(pid))
                time.sleep(0.05)

        try:

            def one(i: int) -> float:
                files = big if big_every and i % big_every == big_every - 1 else small
                t0 = time.perf_counter()
                resp = client.post(f"{base}/predict", files=files)
                resp.raise_for_status()
                return time.perf_counter() - t0

            for i in range(20):
                one(i)
            before = _rss_mib(pid)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                lat = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - t0
            done.set()
            sampler.join()
            after = _rss_mib(pid)
        finally:
            done.set()
    p50, p99 = percentiles(lat)
    thirds = [max(rss[k * len(rss) // 3 : (k + 1) * len(rss) // 3] or [after]) for k in range(3)]
    print(
        f"HTTP /predict on `mamlops serve` (pid {pid}): {requests} requests, "
        f"{concurrency} concurrent, every {big_every}th with 4 x 1024x1024 PNGs: "
        f"{requests / wall:,.0f} req/s  latency p50 {p50:.2f} ms p99 {p99:.2f} ms"
    )
    print(
        f"  server RSS MiB: before {before:.0f}, peak {max(rss):.0f}, after {after:.0f}; "
        f"peak per third of the run {', '.join(f'{x:.0f}' for x in thirds)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classifier", type=Path, help="adapted .safetensors (default: random)")
    ap.add_argument("--dataset", default="omniglot", choices=["omniglot", "miniimagenet"])
    ap.add_argument("--ways", type=int, default=5)
    ap.add_argument("--n", type=int, default=300, help="single-image timing repetitions")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--big-every", type=int, default=10, help="every Nth request: 4 big PNGs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    clf = Classifier.load(args.classifier) if args.classifier else None
    clf = clf or random_classifier(args.dataset, args.ways)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(clf, Path(tmp) / "bench.onnx")
        onx = OnnxClassifier(path)
        print(
            f"model {clf.dataset} {clf.model_cfg.ways}-way, torch threads {torch.get_num_threads()}"
        )
        bench_engines(clf, onx, args.n, args.batch)
        bench_http(path, args.requests, args.concurrency, args.big_every)


if __name__ == "__main__":
    main()
