"""`dvc plots show` as a page that renders without internet.

DVC's HTML loads vega, vega-lite and vega-embed from cdn.jsdelivr.net (the versions named in
dvc_render's ``VegaRenderer.SCRIPTS``), so offline its charts stay blank. This script renders the
plots with ``scripts/dvc_plots_template.html``, whose <script> tags load ``vendor/*.min.js`` beside
the page, and copies those files there from an npm install of exactly the versions DVC names.
The npm install runs only when a version is missing from the cache (``$MAMLOPS_VEGA_CACHE``, by
default ``~/.cache/mamlops/vega``, outside the repository), so it needs the npm registry once.

    python scripts/dvc_plots_offline.py                 # -> dvc_plots/index.html
    python scripts/dvc_plots_offline.py --out some/dir  # (run from the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = Path(__file__).resolve().with_name("dvc_plots_template.html")
PACKAGES = ("vega", "vega-lite", "vega-embed")  # the template loads them in this order


def cache_dir() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "mamlops" / "vega"
    return Path(os.environ.get("MAMLOPS_VEGA_CACHE", default))


def dvc_vega_versions() -> dict[str, str]:
    """``{"vega": "5.20.2", ...}``: the versions DVC's own page loads from the CDN."""
    from dvc_render.vega import VegaRenderer

    found = dict(re.findall(r"/npm/(vega(?:-lite|-embed)?)@([0-9][^\"'/]*)", VegaRenderer.SCRIPTS))
    missing = [p for p in PACKAGES if p not in found]
    if missing:
        raise SystemExit(f"dvc_render names no version of {missing} in VegaRenderer.SCRIPTS")
    return {p: found[p] for p in PACKAGES}


def _bundle(package_dir: Path) -> Path:
    """The browser bundle the CDN serves for a package (its ``jsdelivr`` field)."""
    meta = json.loads((package_dir / "package.json").read_text())
    return package_dir / meta.get("jsdelivr", meta.get("unpkg", f"build/{package_dir.name}.min.js"))


def _installed(cache: Path, package: str, version: str) -> Path | None:
    folder = cache / "node_modules" / package
    try:
        if json.loads((folder / "package.json").read_text())["version"] != version:
            return None
        bundle = _bundle(folder)
    except (OSError, ValueError, KeyError):
        return None
    return bundle if bundle.is_file() else None


def ensure_vega(cache: Path | None = None) -> dict[str, Path]:
    """Paths of the three browser bundles, npm-installing them first if any is missing."""
    cache = cache or cache_dir()
    versions = dvc_vega_versions()
    bundles = {p: _installed(cache, p, v) for p, v in versions.items()}
    if None in bundles.values():
        npm = shutil.which("npm")
        if npm is None:
            raise SystemExit("npm not found: install Node.js and npm (apt-get install npm)")
        cache.mkdir(parents=True, exist_ok=True)
        specs = [f"{p}@{v}" for p, v in versions.items()]
        print(f"npm install {' '.join(specs)} into {cache}", file=sys.stderr)
        # --legacy-peer-deps: DVC's trio is not peer-consistent (vega-lite 5.2.0 asks for vega
        # >= 5.21), which does not matter for the prebuilt bundles used here; no install scripts.
        subprocess.run(
            [npm, "install", "--prefix", str(cache), "--no-audit", "--no-fund", "--ignore-scripts",
             "--legacy-peer-deps", "--loglevel=error", *specs],
            check=True,
        )  # fmt: skip
        bundles = {p: _installed(cache, p, v) for p, v in versions.items()}
        if None in bundles.values():
            raise SystemExit(f"npm install left {cache} without {specs}")
    return bundles  # type: ignore[return-value]


def render(out: Path = ROOT / "dvc_plots", root: Path = ROOT) -> Path:
    """Run ``dvc plots show`` into ``out`` with the offline template; returns the page."""
    bundles = ensure_vega()
    vendor = out / "vendor"
    vendor.mkdir(parents=True, exist_ok=True)
    for package, bundle in bundles.items():
        shutil.copyfile(bundle, vendor / f"{package}.min.js")
    subprocess.run(
        [sys.executable, "-m", "dvc", "plots", "show", "-o", str(out),
         "--html-template", str(TEMPLATE)],
        cwd=root,
        check=True,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    page = out / "index.html"
    html = page.read_text(encoding="utf8")
    if '<script src="http' in html or "vendor/vega-embed.min.js" not in html:
        raise SystemExit(f"{page} was not rendered with {TEMPLATE}")
    return page


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "dvc_plots", help="output folder")
    args = parser.parse_args()
    print(render(args.out.resolve()))


if __name__ == "__main__":
    main()
