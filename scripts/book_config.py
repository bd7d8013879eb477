"""Print ``_config.yml`` with execution switched, for builds that must not re-run chapters.

``make test`` executes the chapters once under nbval, then builds the book from the
committed outputs (``--execute off``); ``make book`` executes them in place first.
Local-extension paths are made absolute, so the output works from any folder; paths that
Jupyter Book resolves against the book root (toc, bibtex files) are left as they are.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--execute", choices=["off", "cache", "force", "auto"], required=True)
    args = parser.parse_args()
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = args.execute
    # Jupyter Book resolves local-extension paths against the config file's folder, so make
    # them absolute: the output then works wherever it is written (e.g. --config /tmp/c.yml).
    local = (config.get("sphinx") or {}).get("local_extensions") or {}
    for name, path in local.items():
        local[name] = str((ROOT / path).resolve())
    print(yaml.safe_dump(config, sort_keys=False))


if __name__ == "__main__":
    main()
