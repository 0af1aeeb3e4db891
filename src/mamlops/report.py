"""Results table: this project's test accuracies next to the MAML paper's, into the README.

Reads metrics/eval/<setting>.json (the accuracies, written by the evaluate stage) with
results/<setting>.json beside it (what was measured on what: task, checkpoint, hardware) and,
when present, metrics/train/<setting>.json, and renders one markdown row per setting.
``update_readme`` rewrites the README between the two markers below, so the numbers in the
README are always the ones the pipeline produced and never typed by hand.

    mamlops report                      # print the table
    mamlops report --readme README.md   # rewrite the README section (make report)
    mamlops report --also benchmarks/results/omniglot-rows   # plus rows trained elsewhere
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mamlops import datasets
from mamlops.errors import UserError
from mamlops.files import write_text

START = "<!-- results:start -->"
END = "<!-- results:end -->"


class ReportError(UserError):
    """Metrics or README cannot be used as they are; the message says what to do."""


def load_results(
    metrics_dir: str | Path = "metrics", results_dir: str | Path | None = None
) -> list[dict[str, Any]]:
    """One dict per evaluated setting: eval metrics and their results file (``results_dir``,
    default ``results/`` beside ``metrics_dir``), plus ``train`` metrics when present."""
    metrics_dir = Path(metrics_dir)
    results_dir = Path(results_dir) if results_dir else metrics_dir.parent / "results"
    rows = []
    for path in sorted((metrics_dir / "eval").glob("*.json")):
        facts = results_dir / path.name
        data = json.loads(facts.read_text()) if facts.is_file() else {}
        data.update(json.loads(path.read_text()))
        data["setting"] = path.stem
        train = metrics_dir / "train" / path.name
        data["train"] = json.loads(train.read_text()) if train.is_file() else {}
        rows.append(data)
    return rows


def load_all(metrics_dir: str | Path = "metrics", also: list[Path] | tuple = ()) -> list[dict]:
    """The pipeline's rows (``metrics_dir``), then those of each folder in ``also`` (each with
    its own ``metrics/`` and ``results/``, e.g. benchmarks/results/omniglot-rows) for settings
    the pipeline did not evaluate; ordered by data set, ways and shots."""
    rows = {r["setting"]: r for r in load_results(metrics_dir)}
    for root in map(Path, also):
        if not (root / "metrics" / "eval").is_dir():
            raise ReportError(f"{root}: no metrics/eval/ folder; give a folder of collected runs")
        for r in load_results(root / "metrics", root / "results"):
            rows.setdefault(r["setting"], r)
    return sorted(rows.values(), key=_order)


def _order(row: dict[str, Any]) -> tuple:
    return (str(row.get("dataset")), row.get("ways") or 0, row.get("shots") or 0, row["setting"])


def _pct(acc: float, ci: float) -> str:
    return f"{100 * acc:.2f} ± {100 * ci:.2f}"


def _train_time(train: dict[str, Any]) -> str:
    seconds = train.get("train_seconds")
    if not isinstance(seconds, int | float):
        return "–"
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def render_table(results: list[dict[str, Any]]) -> str:
    """Markdown table; an explanatory line when nothing has been evaluated yet."""
    if not results:
        return "_No evaluated settings yet: run `dvc repro` (metrics/eval/ is empty)._"
    lines = [
        "| Setting | Task | Accuracy % (transductive BN) | Accuracy % (support BN) "
        "| MAML paper % | MAML++ % | Test episodes | Inner steps | Iterations | Train time "
        "| Hardware |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        # the papers' numbers are facts of the data set (its module in datasets/)
        data = datasets.DATASETS.get(r.get("dataset"))  # type: ignore[arg-type]
        key = (r.get("ways"), r.get("shots"))
        paper = data.paper.get(key) if data else None  # type: ignore[arg-type]
        paper_s = f"{paper[0]:.2f} ± {paper[1]:.2f}" if paper else "–"
        mamlpp = data.mamlpp.get(key, "–") if data else "–"  # type: ignore[arg-type]
        task = f"{r.get('dataset')} {r.get('ways')}-way {r.get('shots')}-shot"
        iters = f"{r.get('iterations')}"
        if r.get("train_iterations") not in (None, r.get("iterations")):
            iters += f" of {r['train_iterations']} (best val)"
        lines.append(
            f"| {r['setting']} | {task} "
            f"| {_pct(r['acc_transductive'], r['ci95_transductive'])} "
            f"| {_pct(r['acc_support'], r['ci95_support'])} "
            f"| {paper_s} | {mamlpp} | {r.get('episodes', '–')} | {r.get('steps')} | {iters} "
            f"| {_train_time(r['train'])} | {r.get('hardware', '–')} |"
        )
    lines.append("")
    lines.append(
        "Mean query accuracy over the fixed test episodes with a 95% confidence interval "
        "(1.96 × population std / √n, as in the paper's code). *Transductive BN* normalises the "
        "query set with its own statistics (the paper's protocol, comparable to its column); "
        "*support BN* freezes the support set's statistics, as the deployed classifier does. "
        "Paper: Finn et al. 2017, Tables 1–2, trained 60,000 iterations on a GPU; MAML++: "
        "Antoniou et al. 2019, Table 1 (Omniglot means as reported, miniImageNet ± std over 3 "
        "seeds)."
    )
    return "\n".join(lines)


def replace_section(text: str, body: str, source: str = "README") -> str:
    """``text`` with everything between the markers replaced by ``body`` (markers kept)."""
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ReportError(
            f"{source}: expected exactly one pair of markers '{START}' ... '{END}'; add them on "
            "their own lines where the results table should go"
        )
    return pattern.sub(lambda _: f"{START}\n{body}\n{END}", text)


def update_readme(readme: str | Path, body: str) -> Path:
    """Rewrite the marked section of ``readme`` atomically (temp file + rename)."""
    readme = Path(readme)
    if not readme.is_file():
        raise ReportError(f"{readme}: file not found")
    new = replace_section(readme.read_text(), body, str(readme))
    return write_text(readme, new)
