"""A team's MLflow tracking server on this machine: PostgreSQL as the backend store, artifacts
served by the tracking server itself (``--artifacts-destination``).

    make tracking-server          # start both; prints the MLFLOW_TRACKING_URI to export
    make tracking-server-check    # a tiny pipeline run logged through it, read back over REST
    make tracking-server-stop

Uses Debian's ``postgresql`` package (``apt-get install postgresql``) and ``psycopg2-binary``
(the ``server`` extra). The database lives in ``.tracking/`` (git-ignored), listens on
127.0.0.1 only and trusts local connections: a shared server needs a password in the backend
URI, TLS in front, and ``mlflow server --app-name basic-auth`` (docs/teams.md).
PostgreSQL refuses to run as root; as root its commands run as the ``postgres`` user.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / ".tracking"
PG_PORT, MLFLOW_PORT = 5433, 5000


# ------------------------------------------------------------------------------ PostgreSQL


def pg_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, else Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which(name)
    if found:
        return found
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name))
    for folder in reversed(versions):
        if (folder / name).is_file():
            return str(folder / name)
    raise SystemExit(
        f"PostgreSQL's {name} not found: install Debian's package (apt-get install postgresql)"
    )


def _as_db_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def start_postgres(state: Path, port: int = PG_PORT) -> str:
    """Create (once) and start a PostgreSQL cluster in ``state/pg`` with a database ``mlflow``;
    returns its SQLAlchemy URI."""
    data = state / "pg"
    if not (data / "PG_VERSION").is_file():
        data.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # the cluster belongs to postgres, who must reach the folder
            shutil.chown(data, "postgres", "postgres")
            for folder in [data.parent, *data.parent.parents]:
                if folder.stat().st_mode & 0o001 == 0:
                    folder.chmod(folder.stat().st_mode | 0o001)
        _run(_as_db_user([pg_bin("initdb"), "-D", str(data), "-U", "mlflow", "-A", "trust"]))
    status = subprocess.run(
        _as_db_user([pg_bin("pg_ctl"), "-D", str(data), "status"]), capture_output=True
    )
    if status.returncode != 0:
        options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
        log = data / "server.log"
        _run(_as_db_user([pg_bin("pg_ctl"), "-D", str(data), "-o", options, "-l", str(log)])
             + ["-w", "start"])  # fmt: skip
    psql = [pg_bin("psql"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "-d", "postgres"]
    exists = _run([*psql, "-tAc", "SELECT 1 FROM pg_database WHERE datname = 'mlflow'"])
    if exists.stdout.strip() != "1":
        _run([*psql, "-c", "CREATE DATABASE mlflow"])
    # the driver named: SQLAlchemy 2.1 takes plain postgresql:// for psycopg 3
    return f"postgresql+psycopg2://mlflow@127.0.0.1:{port}/mlflow"


def stop_postgres(state: Path) -> None:
    data = state / "pg"
    if (data / "PG_VERSION").is_file():
        stop = [pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "stop"]
        subprocess.run(_as_db_user(stop), capture_output=True)


# ------------------------------------------------------------------------------ mlflow server


def start_mlflow(backend: str, state: Path, port: int = MLFLOW_PORT, timeout: float = 180) -> str:
    """``mlflow server`` on 127.0.0.1 with ``backend`` as its store; returns its URL once
    ``/health`` answers (the first start creates the tables: tens of seconds)."""
    url = f"http://127.0.0.1:{port}"
    if _healthy(url):
        return url
    log = open(state / "mlflow-server.log", "ab")  # noqa: SIM115 (the server keeps it)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend]
    cmd += ["--artifacts-destination", str(state / "artifacts"), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, start_new_session=True)
    (state / "mlflow-server.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + timeout
    while not _healthy(url):
        if proc.poll() is not None:
            raise SystemExit(f"mlflow server ended (status {proc.returncode}); see {log.name}")
        if time.monotonic() > deadline:
            raise SystemExit(f"mlflow server did not answer within {timeout:.0f} s; {log.name}")
        time.sleep(0.5)
    return url


def stop_mlflow(state: Path) -> None:
    pid_file = state / "mlflow-server.pid"
    if pid_file.is_file():
        try:
            os.killpg(int(pid_file.read_text()), signal.SIGTERM)
        except ProcessLookupError:
            pass
        pid_file.unlink()


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# ------------------------------------------------------------------------------ the check


def log_tiny_run(prepared: Path, work: Path, setting: str = "tiny-team") -> None:
    """Train, evaluate and export a tiny setting through the stages' own library calls; they
    log to whatever ``MLFLOW_TRACKING_URI`` names."""
    from mamlops.classifier.export import export_stage
    from mamlops.config import EvaluateConfig, ExportConfig, TrainConfig
    from mamlops.layout import Layout
    from mamlops.meta.evaluate import evaluate_stage
    from mamlops.meta.train_stage import train_stage

    tiny = {
        "dataset": "omniglot", "ways": 5, "shots": 1, "query": 2, "meta_batch": 2,
        "inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 1, "meta_lr": 0.001,
        "iterations": 4, "val_every": 2, "val_episodes": 2, "checkpoint_every": 2,
        "log_every": 2, "device": "cpu",
    }  # fmt: skip
    params = {
        "train": {"presets": {setting: tiny}},
        "evaluate": {"checkpoint": "best", "steps": 0, "batch": 50, "grid_episodes": 1},
        "export": {"register": True, "alias": "champion"},
    }
    cfg = TrainConfig.from_params(params, setting)
    layout = Layout(work)
    (work / "data" / "prepared").mkdir(parents=True, exist_ok=True)
    link = layout.prepared("omniglot")
    if not link.exists():
        link.symlink_to(Path(prepared).resolve())
    train_stage(cfg, *layout.train_paths(setting, cfg.dataset), progress=False)
    ev, ex = EvaluateConfig.from_params(params), ExportConfig.from_params(params)
    evaluate_stage(cfg, ev, *layout.evaluate_paths(setting, cfg.dataset))
    export_stage(cfg, ex, *layout.export_paths(setting, cfg.dataset))


def rest(url: str, path: str, query: dict | None = None, body: dict | None = None) -> dict:
    """One call of MLflow's REST API (``/api/2.0/mlflow/...``)."""
    full = f"{url}/api/2.0/mlflow/{path}"
    if query:
        full += "?" + urllib.parse.urlencode(query)
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def read_back(url: str, setting: str = "tiny-team") -> dict:
    """The training run's params and metrics and the registered model, over REST only."""
    experiment = rest(url, "experiments/get-by-name", {"experiment_name": "mamlops"})
    exp_id = experiment["experiment"]["experiment_id"]
    found = rest(
        url,
        "runs/search",
        body={
            "experiment_ids": [exp_id],
            "filter": f"tags.`mamlops.setting` = '{setting}' and params.`train.iterations` = '4'",
        },
    )["runs"]
    train_runs = [r for r in found if r["info"]["run_name"].startswith(setting)]
    run = train_runs[0]
    model = rest(url, "registered-models/get", {"name": f"mamlops-{setting}"})["registered_model"]
    return {
        "runs": len(train_runs),
        "status": run["info"]["status"],
        "params": {p["key"]: p["value"] for p in run["data"].get("params", [])},
        "metrics": {m["key"]: m["value"] for m in run["data"].get("metrics", [])},
        "model_versions": [v["version"] for v in model.get("latest_versions", [])],
        "aliases": [a["alias"] for a in model.get("aliases", [])],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("start", "stop", "check"))
    ap.add_argument("--state", type=Path, default=STATE, help="folder for the database and logs")
    ap.add_argument("--pg-port", type=int, default=PG_PORT)
    ap.add_argument("--port", type=int, default=MLFLOW_PORT, help="mlflow server's port")
    args = ap.parse_args()
    args.state.mkdir(parents=True, exist_ok=True)
    if args.action == "stop":
        stop_mlflow(args.state)
        stop_postgres(args.state)
        print("stopped")
        return
    url = start_mlflow(start_postgres(args.state, args.pg_port), args.state, args.port)
    if args.action == "start":
        print(f"MLflow tracking server on PostgreSQL: export MLFLOW_TRACKING_URI={url}")
        return
    os.environ["MLFLOW_TRACKING_URI"] = url
    prepared = ROOT / "data" / "prepared" / "omniglot"
    if not (prepared / "meta.json").is_file():
        raise SystemExit(f"{prepared}: not prepared; run `dvc repro prepare@omniglot` first")
    log_tiny_run(prepared, args.state / "check")
    print(json.dumps(read_back(url), indent=1))


if __name__ == "__main__":
    main()
