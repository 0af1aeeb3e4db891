"""Serving speed: onnxruntime vs PyTorch eager on the same inputs, then HTTP under load.

Measures single-image latency (p50/p99), batch throughput, and the FastAPI endpoint with
concurrent clients (bounded request count, 127.0.0.1 only; the server stops by itself).
Without ``--classifier`` it uses a random-weight Omniglot-shaped classifier: speed does not
depend on the weights' values.

    .venv/bin/python benchmarks/bench_serving.py [--classifier X.safetensors] [--requests 400]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch
import uvicorn
from PIL import Image

from mamlops.classifier import Classifier
from mamlops.export import export_onnx
from mamlops.model import ConvNetConfig, batch_stats, init_params
from mamlops.onnx_predict import OnnxClassifier
from mamlops.serve import create_app


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


def bench_http(model_path: Path, image_size: int, requests: int, concurrency: int) -> None:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (105, 105), np.uint8)).save(
        buf, format="PNG"
    )
    png = buf.getvalue()
    config = uvicorn.Config(create_app(model_path), host="127.0.0.1", port=0, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/predict"
    try:
        with httpx.Client(timeout=30) as client:

            def one(_: int) -> float:
                t0 = time.perf_counter()
                resp = client.post(url, files=[("files", ("x.png", png, "image/png"))])
                resp.raise_for_status()
                return time.perf_counter() - t0

            for i in range(20):
                one(i)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                lat = list(pool.map(one, range(requests)))
            wall = time.perf_counter() - t0
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    p50, p99 = percentiles(lat)
    print(
        f"HTTP /predict {requests} requests, {concurrency} concurrent: {requests / wall:,.0f} req/s"
        f"  latency p50 {p50:.2f} ms p99 {p99:.2f} ms"
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
        bench_http(path, clf.model_cfg.image_size, args.requests, args.concurrency)


if __name__ == "__main__":
    main()
