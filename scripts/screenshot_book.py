"""Screenshot every page of the built book in headless Chromium, for a human to look at (issue: read the book
as readers meet it).

Per page it writes the top of the page and one crop per figure, equation, exercise and widget section, so
diagrams, numbered captions, folded solutions and widgets' static fallbacks can be checked by eye. Headless
Chromium does not paint a page scrolled to an anchor, so the script first asks the page (a copy with a small
injected script, read back with ``--dump-dom``) for its height and the position of each anchor, then takes one
full-height screenshot and crops it. Needs the Debian ``chromium`` package; it reads only the local
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

from PIL import Image
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


def layout(browser: str, page: Path, width: int) -> dict:
    """Page height and anchor positions (CSS px), measured in a temporary copy of the page."""
    probe = page.with_name(f"_layout_probe_{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE), encoding="utf-8")
    try:
        dom = run(browser, f"--window-size={width},1400", "--dump-dom", probe.resolve().as_uri())
    finally:
        probe.unlink()
    found = re.search(r'data-layout="([^"]*)"', dom)
    if not found:
        raise SystemExit(f"{page}: could not measure the page")
    return json.loads(html.unescape(found[1]))


def shoot(browser: str, page: Path, out: Path, width: int, height: int, max_height: int) -> list[Path]:
    """One full-height screenshot of ``page``, cropped to its top and to each anchor."""
    info = layout(browser, page, width)
    full = out / f"_full_{page.stem}.png"
    run(browser, f"--window-size={width},{min(info['height'], max_height)}", f"--screenshot={full}",
        page.resolve().as_uri())
    image, written = Image.open(full), []
    for name, top in [("", 0), *info["anchors"].items()]:
        if top >= image.height:
            continue
        path = out / f"{page.stem}{'--' + name if name else ''}.png"
        image.crop((0, max(0, top - 80), width, min(image.height, top - 80 + height))).save(path)
        written.append(path)
    full.unlink()
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--html", type=Path, default=ROOT / "_build" / "html", help="the built book")
    parser.add_argument("--out", type=Path, default=ROOT / "_build" / "screenshots")
    parser.add_argument("--width", type=int, default=1200, help="window width, CSS px")
    parser.add_argument("--height", type=int, default=1400, help="height of each crop, px")
    parser.add_argument("--max-height", type=int, default=60000, help="longest page screenshot, px")
    parser.add_argument("--pages", nargs="*", default=None, help="page stems to shoot (default: all)")
    args = parser.parse_args()
    browser = chromium()
    pages = sorted(p for p in args.html.rglob("*.html") if not {"_static", "_modules", "_sources"} & set(p.parts)
                   and p.name not in ("genindex.html", "search.html", "py-modindex.html")
                   and not p.name.startswith("_layout_probe_"))
    if args.pages:
        pages = [p for p in pages if p.stem in args.pages]
    args.out.mkdir(parents=True, exist_ok=True)
    shots = [s for page in tqdm(pages, desc="pages") for s in shoot(browser, page, args.out, args.width,
                                                                     args.height, args.max_height)]
    print(f"{len(shots)} screenshots of {len(pages)} pages in {args.out}")


if __name__ == "__main__":
    main()
