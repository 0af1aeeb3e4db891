"""Do two versions of the code produce the same pipeline outputs? For refactors: run a tiny
``dvc repro`` (20 iterations, 100 test episodes, 1 test step) of each source tree and compare
every output by SHA-256, and every metric by value.

    git worktree add /tmp/before <commit>
    .venv/bin/python scripts/same_outputs.py /tmp/before .

Each tree runs in a fresh copy (what a clone holds, the working tree's changes included) with
its own ``src/`` first on PYTHONPATH, so the venv's editable install does not mask it; both runs
use this venv's packages and the Omniglot mirror ($MAMLOPS_DATA_MIRROR, else ../shared). Exit
status 1 when an output or a metric differs; timings (tasks/s, seconds) are left out. About
three minutes per tree on a 2-core machine; run nothing else heavy meanwhile.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

SETTING = "omniglot-5w1s"
TINY = dict(iterations=20, meta_batch=4, query=5, val_every=10, val_episodes=10)
TIMINGS = {"tasks_per_s", "train_seconds", "seconds"}


def tiny_copy(src: Path, dest: Path) -> None:
    """A committed copy of ``src``'s files with a training budget of seconds."""
    listed = ["git", "ls-files", "-co", "--exclude-standard", "-z"]
    files = subprocess.run(listed, cwd=src, capture_output=True, text=True, check=True).stdout
    for rel in filter(None, files.split("\0")):
        if (src / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    presets = yaml.safe_load((dest / "presets.yaml").read_text())
    presets[SETTING].update(TINY, checkpoint_every=10, log_every=5)
    params["train"]["settings"] = {SETTING: "omniglot"}
    params["prepare"]["episodes"]["count"] = 100
    params["evaluate"]["steps"] = 1
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (dest / "presets.yaml").write_text(yaml.safe_dump(presets, sort_keys=False))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "tiny"], cwd=dest, check=True)


def outputs(src: Path, work: Path) -> dict[str, str]:
    """``dvc repro`` of ``src`` in ``work``: every output file's digest, every metric's value."""
    tiny_copy(src, work)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "DVC_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["PYTHONPATH"] = str(work / "src")
    mirror = Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot"
    env.setdefault("MAMLOPS_DATA_MIRROR", str(mirror))
    proc = subprocess.run(["dvc", "repro"], cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"dvc repro of {src} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    found = {}
    for folder in ("data/prepared", "models", "plots"):
        for path in sorted((work / folder).rglob("*")):
            if path.is_file():
                found[str(path.relative_to(work))] = hashlib.sha256(path.read_bytes()).hexdigest()
    for path in sorted([*(work / "metrics").rglob("*.json"), *(work / "results").glob("*.json")]):
        for key, value in json.loads(path.read_text()).items():
            if key not in TIMINGS:
                found[f"{path.relative_to(work)}:{key}"] = json.dumps(value, sort_keys=True)
    return found


def main() -> int:
    if len(sys.argv) != 3:
        sys.exit("usage: same_outputs.py TREE_A TREE_B")
    a, b = (Path(p).resolve() for p in sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        first, second = outputs(a, Path(tmp, "a")), outputs(b, Path(tmp, "b"))
    differ = sorted(k for k in first.keys() | second.keys() if first.get(k) != second.get(k))
    for key in differ:
        was, now = first.get(key, "(missing)"), second.get(key, "(missing)")
        print(f"differs: {key}: {was[:16]} / {now[:16]}")
    print(
        f"{len(first.keys() | second.keys()) - len(differ)} outputs and metrics identical, "
        f"{len(differ)} differ ({a} / {b})"
    )
    for key in ("models/omniglot-5w1s/theta.safetensors", "models/omniglot-5w1s/model.onnx"):
        print(f"  {key}: {second.get(key, '(missing)')[:16]}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
