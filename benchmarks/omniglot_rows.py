"""The paper's other Omniglot rows on the CPU: each setting trained and evaluated by the real
pipeline as the DVC experiment ``row-<setting>``, its results kept for the README table.

``make run`` trains the default setting (omniglot-5w1s). This trains the CPU-sized presets of
the other three (presets.yaml: omniglot-5w5s, omniglot-20w1s, omniglot-20w5s), each alone, one
at a time (``dvc queue start -j 1``), through download/prepare (cached), train, evaluate and
export. ``collect`` then copies each experiment's ``metrics/eval``, ``metrics/train`` and
``results`` files (from its git ref, as DVC committed them) to
``benchmarks/results/omniglot-rows/``, which ``mamlops report --also`` adds to the README table::

    .venv/bin/python benchmarks/omniglot_rows.py run       # about 1.5 h on 2 cores
    .venv/bin/python benchmarks/omniglot_rows.py collect
    .venv/bin/mamlops report --readme README.md --also benchmarks/results/omniglot-rows

``make omniglot-rows`` does all three.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from time_to_accuracy import ROOT, queue, run_queue

SETTINGS = ("omniglot-5w5s", "omniglot-20w1s", "omniglot-20w5s")
RESULTS = ROOT / "benchmarks" / "results" / "omniglot-rows"
FILES = ("metrics/eval/{}.json", "metrics/train/{}.json", "results/{}.json")


def git(*args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def exp_name(setting: str) -> str:
    return "row-" + setting.removeprefix("omniglot-")


def newest_ref(name: str) -> str | None:
    """The newest experiment ref named ``name`` (DVC keeps them under refs/exps/<base>/<name>)."""
    refs = git(
        "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps"
    ).splitlines()
    return next((r for r in refs if r.rsplit("/", 1)[-1] == name), None)


def run(settings: list[str]) -> None:
    for setting in settings:
        queue(exp_name(setting), setting, "omniglot", {})
        print(f"queued {exp_name(setting)}", flush=True)
    run_queue()


def collect(settings: list[str]) -> None:
    for setting in settings:
        ref = newest_ref(exp_name(setting))
        if ref is None:
            sys.exit(f"no experiment {exp_name(setting)}: run `omniglot_rows.py run` first")
        for pattern in FILES:
            rel = pattern.format(setting)
            dest = RESULTS / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(git("show", f"{ref}:{rel}"))
        print(f"{setting}: {ref} -> {RESULTS.relative_to(ROOT)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("run", "collect", "all"))
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=SETTINGS)
    args = ap.parse_args()
    if args.action in ("run", "all"):
        run(args.settings)
    if args.action in ("collect", "all"):
        collect(args.settings)


if __name__ == "__main__":
    main()
