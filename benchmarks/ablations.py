"""Ablations: one preset trained once per recipe, every model scored on the same test episodes.

The question an ablation answers is "what does this one difference cost", and two models scored
on the same 600 episodes answer it more sharply than two confidence intervals side by side: the
report gives each recipe's accuracy and its difference to the study's first recipe with a
*paired* 95% CI (``1.96 * std(d) / sqrt(n)`` over the per-episode differences ``d``), which
removes the episodes' own spread. It does not remove the spread of training itself (another
seed is another model); the report says so.

The studies live in ``benchmarks/ablations.yaml``. The library does the work (``train.train``,
``evaluate.evaluate_setting``), without DVC or MLflow, so that the same command runs on a
machine that has PyTorch but not the venv (a lent GPU: ``--device cuda``, see
docs/accuracy.md), and so that the per-episode accuracies are at hand::

    .venv/bin/python benchmarks/ablations.py run fidelity-5w1s       # resumable, one at a time
    .venv/bin/python benchmarks/ablations.py report fidelity-5w1s

``run`` prepares Omniglot with the repository's params into ``<out>/prepared`` (from
``--raw``, default ``data/raw/omniglot``, or the mirror's zips), plus the reference code's
nearest-neighbour images when a recipe asks for them, then trains each recipe into
``<out>/<recipe>/`` (a killed run resumes from its checkpoint) and writes ``result.json``:
config, seconds, validation history and both BatchNorm protocols' per-episode test accuracies,
with 15 query images per class and with the reference code's K. ``report`` writes
``<out>/report.md``. ``<out>`` defaults to ``benchmarks/results/ablations/<study>``.
"""

# ruff: noqa: E402  (sys.path is set before the project imports)
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

import numpy as np
import yaml
from PIL import Image

from mamlops import datasets
from mamlops.config import PrepareConfig, TrainConfig
from mamlops.data.prepare import IMAGES_FILE, prepare_dataset
from mamlops.files import write_json, write_text
from mamlops.hardware import hardware, resolve_device
from mamlops.malloc import keep_freed_memory
from mamlops.meta.checkpoint import load_theta, theta_file
from mamlops.meta.evaluate import evaluate_setting
from mamlops.meta.train import train
from mamlops.params import load_params

STUDIES = ROOT / "benchmarks" / "ablations.yaml"
RESULTS = ROOT / "benchmarks" / "results" / "ablations"
IMAGES = ("lanczos", "nearest")


def load_study(name: str) -> dict:
    studies = yaml.safe_load(STUDIES.read_text())
    if name not in studies:
        sys.exit(f"{STUDIES}: no study {name!r}; known: {', '.join(studies)}")
    return studies[name]


def recipe_config(study: dict, name: str, params: dict, device: str) -> tuple[TrainConfig, str]:
    """The preset of ``study`` under its overrides and the recipe's keys, checked by the
    schema like any preset, and the images the recipe trains on."""
    keys = {**study.get("overrides", {}), **study["recipes"][name]}
    keys.pop("theta", None)
    images = keys.pop("images", "lanczos")
    if images not in IMAGES:
        sys.exit(f"recipe {name}: images must be one of {IMAGES}, got {images!r}")
    base = params["presets.yaml"][study["preset"]]
    merged = {**params["train"]["common"], **base, **keys, "device": device}
    return TrainConfig.from_flat({**merged, "name": f"{study['preset']}+{name}"}, name), images


def raw_omniglot(raw: Path, work: Path) -> Path:
    """``raw`` if it holds the two Omniglot folders, else the mirror's zips extracted into
    ``work`` (the repository's mirror beside the checkout)."""
    if (raw / "images_background").is_dir():
        return raw
    mirror = ROOT.parent / "shared" / "data" / "omniglot"
    zips = [mirror / f"{name}.zip" for name in ("images_background", "images_evaluation")]
    if not all(z.is_file() for z in zips):
        sys.exit(f"no Omniglot at {raw} and no zips at {mirror}: run `dvc repro download`")
    for z in zips:
        with zipfile.ZipFile(z) as f:
            f.extractall(work)
    return work


def nearest_images(raw: Path) -> np.ndarray:
    """Omniglot as the reference code saw it: each 1-bit PNG resized to 28x28 by Pillow with
    ``LANCZOS`` asked for, which Pillow replaces by nearest-neighbour for mode "1" images (its
    ``resize_images.py``), then read as 0/255 grayscale."""
    omniglot = datasets.get("omniglot")
    files, side = omniglot.list_classes(raw).files, omniglot.image_size
    out = np.empty((len(files), len(files[0]), side, side), dtype=np.uint8)
    for i, pngs in enumerate(files):
        for j, png in enumerate(pngs):
            im = Image.open(png)
            im = im.resize((side, side), resample=Image.Resampling.LANCZOS).convert("L")
            out[i, j] = np.asarray(im, dtype=np.uint8)
    return out


def prepared(out: Path, raw: Path, images: str) -> Path:
    """The prepared folder for ``images`` under ``out`` (made once, by the project's prepare)."""
    folder = out / "prepared" / images
    if (folder / "meta.json").is_file():
        return folder
    cfg = PrepareConfig.from_params(load_params(ROOT / "params.yaml"))
    with tempfile.TemporaryDirectory() as tmp:
        source = raw_omniglot(raw, Path(tmp))
        if images == "lanczos":
            prepare_dataset("omniglot", source, folder, cfg)
        else:
            base = prepared(out, raw, "lanczos")
            work = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(base, work)
            np.save(work / IMAGES_FILE, nearest_images(source))
            work.rename(folder)
    return folder


def scores(result: dict) -> dict:
    """Per-episode final accuracies of both protocols (and the within-alphabet ones)."""
    out = {p: result[p]["per_episode"] for p in ("transductive", "support")}
    return out


def run_recipe(study: dict, name: str, out: Path, raw: Path, device: str) -> dict:
    done = out / name / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    params = load_params(ROOT / "params.yaml")
    cfg, images = recipe_config(study, name, params, device)
    data = prepared(out, raw, images)
    trained = study["recipes"][name].get("theta")
    if trained:  # a theta trained elsewhere (a GPU run's files): scored, not trained
        print(f"[{name}] scoring {trained}", flush=True)
        theta, meta = load_theta(ROOT / trained)
        seconds, tasks_per_s, best_val, history = 0.0, 0.0, float("nan"), []
    else:
        print(f"[{name}] training {cfg.iterations} iterations on {images} images", flush=True)
        t0 = time.perf_counter()
        res = train(cfg, data, out / name / "model", out / name / "checkpoints", progress=False)
        seconds = time.perf_counter() - t0
        theta, meta = load_theta(theta_file(out / name / "model", "best"))
        tasks_per_s, best_val = res.tasks_per_s, res.best_val_acc
        history = [(row["step"], row["val_acc"]) for row in res.history if "val_acc" in row]
    t1 = time.perf_counter()
    standard = evaluate_setting(theta, cfg, data, within_alphabet=True, curve=False)
    # the reference code's test protocol: K query images per class
    reference = evaluate_setting(theta, cfg, data, query=cfg.shots, curve=False)
    # the validation classes, for choosing a recipe without looking at the test classes
    val = evaluate_setting(theta, cfg, data, within_alphabet=True, curve=False, subset="val")
    result = {
        "recipe": name,
        "keys": study["recipes"][name],
        "config": cfg.to_dict(),
        "images": images,
        "split": standard["split"],
        "hardware": hardware(resolve_device(device)),
        "train_seconds": round(seconds, 1),
        "tasks_per_s": round(tasks_per_s, 2),
        "eval_seconds": round(time.perf_counter() - t1, 1),
        "best_step": int(meta["step"]),
        "best_val_acc": best_val,
        "val": history,
        "test": scores(standard),
        "test_k_query": scores(reference),
        "alphabet": None if standard.get("alphabet") is None else scores(standard["alphabet"]),
        "val_episodes": scores(val),
        "val_alphabet": None if val.get("alphabet") is None else scores(val["alphabet"]),
    }
    write_json(done, result)
    t = np.mean(result["test"]["transductive"])
    print(f"[{name}] test {100 * t:.2f}% transductive ({seconds / 60:.1f} min)", flush=True)
    return result


def mean_ci(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(1.96 * a.std() / math.sqrt(len(a)))


def cell(values: list[float]) -> str:
    m, ci = mean_ci(values)
    return f"{100 * m:.2f} ± {100 * ci:.2f}"


def diff(a: list[float], b: list[float], paired: bool) -> str:
    """``b - a`` in points, with the paired CI when both were scored on the same episodes."""
    if not paired:
        return f"{100 * (np.mean(b) - np.mean(a)):+.2f} (other episodes)"
    m, ci = mean_ci(list(np.asarray(b) - np.asarray(a)))
    return f"{100 * m:+.2f} ± {100 * ci:.2f}"


def report(name: str, study: dict, out: Path) -> str:
    results = []
    for recipe in study["recipes"]:
        path = out / recipe / "result.json"
        if path.is_file():
            results.append(json.loads(path.read_text()))
    if not results:
        sys.exit(f"nothing to report in {out}: run the study first")
    base = results[0]
    lines = [
        f"Study `{name}`: preset `{study['preset']}` with {study.get('overrides', {})}; "
        f"{base['hardware']}. Test: {len(base['test']['transductive'])} fixed episodes, "
        f"15 query images per class (and the reference code's K per class); Δ is paired "
        f"against `{base['recipe']}` on the same episodes (episode noise only: another "
        "training seed moves a model too).",
        "",
        "| recipe | keys | split | best val % (step) | test % transductive | Δ | support BN | Δ "
        "| K query/class, transductive | Δ | min |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        same = r["split"] == base["split"]
        keys = ", ".join(f"{k}={v}" for k, v in r["keys"].items()) or "(preset)"
        row = [
            r["recipe"],
            keys,
            r["split"],
            f"{100 * r['best_val_acc']:.2f} ({r['best_step']})"
            if r["val"]
            else f"trained elsewhere (step {r['best_step']})",
        ]
        for part, protocol in (
            ("test", "transductive"),
            ("test", "support"),
            ("test_k_query", "transductive"),
        ):
            row.append(cell(r[part][protocol]))
            row.append("–" if r is base else diff(base[part][protocol], r[part][protocol], same))
        minutes = (r["train_seconds"] + r["eval_seconds"]) / 60
        row.append(f"{minutes:.1f}" + ("" if r["val"] else " (scoring)"))
        lines.append("| " + " | ".join(row) + " |")
    alphabet = [r for r in results if r.get("alphabet") and r.get("val_alphabet")]
    if alphabet:
        first = alphabet[0]
        lines += [
            "",
            "Within one alphabet (N upright characters of one script; the validation alphabets "
            "choose a recipe, the test alphabets report it):",
            "",
            "| recipe | split | val: support BN | val: transductive | test: support BN | Δ "
            "| test: transductive | Δ |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in alphabet:
            same = r["split"] == first["split"]
            row = [r["recipe"], r["split"]]
            row += [cell(r["val_alphabet"][p]) for p in ("support", "transductive")]
            for protocol in ("support", "transductive"):
                row.append(cell(r["alphabet"][protocol]))
                row.append(
                    "–"
                    if r is first
                    else diff(first["alphabet"][protocol], r["alphabet"][protocol], same)
                )
            lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    write_text(out / "report.md", text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("run", "report", "all"))
    ap.add_argument("study")
    ap.add_argument("--only", nargs="*", help="a subset of the study's recipes")
    ap.add_argument("--out", type=Path, help="default benchmarks/results/ablations/<study>")
    ap.add_argument("--raw", type=Path, default=ROOT / "data" / "raw" / "omniglot")
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    ap.add_argument("--iterations", type=int, help="override the study's horizon (smoke runs)")
    args = ap.parse_args()
    study = load_study(args.study)
    if args.iterations:
        study = {
            **study,
            "overrides": {**study.get("overrides", {}), "iterations": args.iterations},
        }
    out = args.out or RESULTS / args.study
    unknown = sorted(set(args.only or ()) - set(study["recipes"]))
    if unknown:
        sys.exit(f"unknown recipe(s) {unknown}; {args.study} has {', '.join(study['recipes'])}")
    if args.action in ("run", "all"):
        keep_freed_memory()  # process-wide, no effect on results (malloc.py)
        for recipe in study["recipes"]:
            if not args.only or recipe in args.only:
                run_recipe(study, recipe, out, args.raw, args.device)
    if args.action in ("report", "all"):
        print(report(args.study, study, out))


if __name__ == "__main__":
    main()
