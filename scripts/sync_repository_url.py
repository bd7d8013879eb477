"""Propagate the repository URL set in ``_config.yml`` to README.md and the chapters.

``repository.url`` (and ``repository.branch``) in ``_config.yml`` is the one place the book's
repository is named. Jupyter Book builds its own launch and repository buttons from it; this
script rewrites the places it cannot reach, so a fork changes one line and runs::

    .venv/bin/python scripts/sync_repository_url.py          # rewrite README.md, notebooks/*.ipynb
    .venv/bin/python scripts/sync_repository_url.py --check  # exit 1 if anything is out of date

What is rewritten, in README.md and every ``notebooks/*.ipynb`` (as raw text, so a notebook's
formatting and outputs are untouched):

- Colab links and badges: ``https://colab.research.google.com/github/OWNER/REPO/blob/BRANCH/PATH``
  get the configured OWNER/REPO/BRANCH; PATH is kept;
- pip installs from the repository: ``git+https://github.com/OWNER/REPO[.git][@REF]``; a ``@REF``
  that names a branch becomes ``@BRANCH``, one that pins a version tag (``@v1.2``) or a commit
  (7-40 hex digits) is kept;
- in README.md only: ``git clone https://github.com/OWNER/REPO`` and BibTeX ``url = {...}`` /
  ``howpublished = {\\url{...}}`` fields that point to a GitHub repository.

``--check`` also fails when a chapter has no Colab link to itself, or README.md has no Colab
link to a chapter; the script cannot write those, so it reports them in both modes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
COLAB = "https://colab.research.google.com"
_SEG = r"[A-Za-z0-9_.\-]+"

# Colab "open from GitHub" links: .../github/OWNER/REPO/blob/BRANCH/PATH
COLAB_RE = re.compile(rf"https://colab\.research\.google\.com/github/{_SEG}/{_SEG}/blob/{_SEG}/"
                      r"(?P<path>[^\s)\"'<>\\]+)")
# pip installs from the repository; a .git suffix is kept, a branch @ref follows the config
GIT_PLUS_RE = re.compile(rf"git\+https://github\.com/{_SEG}/(?P<repo>{_SEG})(?P<ref>@[^\s\"'#)\\]+)?")
# README only: clone commands and BibTeX url fields
CLONE_RE = re.compile(rf"(?P<head>git clone )https://github\.com/{_SEG}/(?P<repo>{_SEG})")
BIBURL_RE = re.compile(rf"(?P<head>(?:url\s*=\s*\{{|\\url\{{))https://github\.com/{_SEG}/(?P<repo>{_SEG})(?=/?\}})")


def read_repository(config_path: Path) -> tuple[str, str, str]:
    """``(owner, repo, branch)`` from ``repository.url`` / ``repository.branch`` of the config."""
    config = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    repository = config.get("repository") or {}
    url = str(repository.get("url", "")).strip().rstrip("/")
    match = re.fullmatch(rf"https://github\.com/({_SEG})/({_SEG})", url)
    if not match:
        raise SystemExit(f"{config_path}: repository.url must look like https://github.com/OWNER/REPO, "
                         f"got {url!r}")
    return match.group(1), _strip_git(match.group(2)), str(repository.get("branch") or "main")


def _strip_git(name: str) -> str:
    return name[:-4] if name.endswith(".git") else name


def _git_suffix(match: re.Match) -> str:
    return ".git" if match.group("repo").endswith(".git") else ""


def _ref(match: re.Match, branch: str) -> str:
    """The ``@ref`` of a pip URL: pinned tags and commits stay, branch names follow the config."""
    ref = match.group("ref")
    if not ref or re.fullmatch(r"@(v?\d[\w.\-]*|[0-9a-f]{7,40})", ref):
        return ref or ""
    return f"@{branch}"


def rewrite(text: str, owner: str, repo: str, branch: str, readme: bool) -> str:
    """Return ``text`` with every repository reference pointing at OWNER/REPO (and BRANCH)."""
    base = f"https://github.com/{owner}/{repo}"
    text = COLAB_RE.sub(lambda m: f"{COLAB}/github/{owner}/{repo}/blob/{branch}/{m.group('path')}", text)
    text = GIT_PLUS_RE.sub(lambda m: f"git+{base}{_git_suffix(m)}{_ref(m, branch)}", text)
    if readme:
        text = CLONE_RE.sub(lambda m: f"{m.group('head')}{base}{_git_suffix(m)}", text)
        text = BIBURL_RE.sub(lambda m: f"{m.group('head')}{base}", text)
    return text


def colab_paths(text: str) -> set[str]:
    """Repository paths that the Colab links in ``text`` open."""
    return {m.group("path") for m in COLAB_RE.finditer(text)}


def report(changed: list[str], problems: list[str], check: bool, fix: str, done: str) -> int:
    """Print what a sync script changed (or, with ``check``, would change) and its problems; return the exit code.

    Shared by the sync scripts: ``fix`` is the command to run when ``check`` finds stale files, ``done`` the line
    printed when nothing was stale and nothing is wrong.
    """
    for line in changed + problems:
        print(line)
    if check and changed:
        print(f"run: {fix}")
    if not changed and not problems:
        print(done)
    return 1 if problems or (check and changed) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 if any file is out of date")
    parser.add_argument("--root", type=Path, default=ROOT, help="book root (default: this repository)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    owner, repo, branch = read_repository(root / "_config.yml")

    readme = root / "README.md"
    notebooks = sorted((root / "notebooks").glob("*.ipynb"))
    files = ([readme] if readme.exists() else []) + notebooks
    stale, problems = [], []
    for path in files:
        text = path.read_text(encoding="utf-8")
        new = rewrite(text, owner, repo, branch, readme=path == readme)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new, encoding="utf-8")
        if path in notebooks:
            own = f"notebooks/{path.name}"
            if own not in colab_paths(new):
                problems.append(f"{path.relative_to(root)}: no Colab link to itself ({own})")
    if readme.exists():
        linked = colab_paths(readme.read_text(encoding="utf-8") if not args.check
                             else rewrite(readme.read_text(encoding="utf-8"), owner, repo, branch, True))
        for path in notebooks:
            if f"notebooks/{path.name}" not in linked:
                problems.append(f"README.md: no Colab link to notebooks/{path.name}")
    else:
        problems.append("README.md is missing")

    target = f"https://github.com/{owner}/{repo} (branch {branch})"
    verb = "out of date" if args.check else "updated"
    return report([f"{path.relative_to(root)}: {verb} (repository: {target})" for path in stale], problems,
                  args.check, f"python scripts/sync_repository_url.py   (to point them at {target})",
                  f"up to date: {len(files)} file(s) point at {target}")


if __name__ == "__main__":
    sys.exit(main())
