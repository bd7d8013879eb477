"""Screenshot every page of the built book in headless Chromium, for a human to look at (issue: read the book
as readers meet it).

Per page it writes the top of the page and one crop per figure, equation, exercise and widget section, so
diagrams, numbered captions, folded solutions and widgets' static fallbacks can be checked by eye. Headless
Chromium does not paint a page scrolled to an anchor, so the script first asks the page (a copy with a small
injected script, read back with ``--dump-dom``) for the position of each anchor, then shoots a copy of the page
shifted up by that much (a negative top margin), one window-sized screenshot per anchor. Needs the Debian ``chromium`` package; it reads only the local
``_build/html``, so no network is used (widgets then show their static fallback, as offline readers see them).
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
ANCHORS = r"^(fig|ex|equation)-|explore|try-it"
PROBE = ('<script>window.addEventListener("load",()=>{setTimeout(()=>{const a={};'
         'document.querySelectorAll("[id]").forEach(e=>{if(/%s/.test(e.id)){'
         'a[e.id]=Math.round(e.getBoundingClientRect().top+window.scrollY)}});'
         'document.body.setAttribute("data-layout",JSON.stringify({height:document.documentElement.scrollHeight,'
         'anchors:a}))},500)});</script></body>') % ANCHORS


def chromium() -> str:
    """The Chromium binary, or a clear error saying how to get one."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise SystemExit("no Chromium found: install the Debian package `chromium` (apt install chromium)")


def run(browser: str, *args: str) -> str:
    """Run headless Chromium with the given arguments and return its stdout."""
    return subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--virtual-time-budget=4000", *args], check=True, capture_output=True, text=True,
                          timeout=180).stdout


def layout(browser: str, page: Path, width: int) -> dict | None:
    """Page height and anchor positions (CSS px), measured in a temporary copy of the page; None for a page
    that never finishes loading (index.html only redirects)."""
    probe = page.with_name(f"_layout_probe_{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE), encoding="utf-8")
    try:
        dom = run(browser, f"--window-size={width},1400", "--dump-dom", probe.resolve().as_uri())
    finally:
        probe.unlink()
    found = re.search(r'data-layout="([^"]*)"', dom)
    return json.loads(html.unescape(found[1])) if found else None


def shoot(browser: str, page: Path, out: Path, width: int, height: int) -> list[Path]:
    """The top of ``page`` and one window-sized screenshot per anchor, each from a copy shifted up to it."""
    written, measured = [], layout(browser, page, width)
    anchors = measured["anchors"] if measured else {}
    for name, top in [("", 0), *anchors.items()]:
        shifted = page.with_name(f"_layout_shift_{page.name}")
        style = f"<style>body{{margin-top:-{max(0, top - 80)}px !important}}</style></head>"
        shifted.write_text(page.read_text(encoding="utf-8").replace("</head>", style, 1), encoding="utf-8")
        path = out / f"{page.stem}{'--' + name if name else ''}.png"
        try:
            run(browser, f"--window-size={width},{height}", f"--screenshot={path}", shifted.resolve().as_uri())
        finally:
            shifted.unlink()
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html", help="the built book")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "screenshots")
    parser.add_argument("--width", type=int, default=1200, help="window width, CSS px")
    parser.add_argument("--height", type=int, default=1400, help="window height, CSS px")
    parser.add_argument("--pages", nargs="*", default=None, help="page stems to shoot (default: all)")
    args = parser.parse_args()
    browser = chromium()
    pages = sorted(p for p in args.html.rglob("*.html") if not {"_static", "_modules", "_sources"} & set(p.parts)
                   and p.name not in ("genindex.html", "search.html", "py-modindex.html", "index.html")
                   and not p.name.startswith("_layout_"))
    if args.pages:
        pages = [p for p in pages if p.stem in args.pages]
    args.out.mkdir(parents=True, exist_ok=True)
    shots = [s for page in tqdm(pages, desc="pages") for s in shoot(browser, page, args.out, args.width, args.height)]
    print(f"{len(shots)} screenshots of {len(pages)} pages in {args.out}")


if __name__ == "__main__":
    main()
