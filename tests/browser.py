"""Open an HTML file in headless Chromium and count the images that loaded."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

PROBE = ("<script>window.addEventListener('load', () => { const all = [...document.images];"
         " const ok = all.filter(i => i.complete && i.naturalWidth > 0);"
         " document.title = 'IMAGES ' + ok.length + '/' + all.length; });</script>")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--virtual-time-budget=10000", "--dump-dom"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def images_loaded(html_file: Path) -> tuple[int, int]:
    """(images that loaded, images on the page) as Chromium renders ``html_file``."""
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "page.html"
        page.write_text(html_file.read_text().replace("</body>", PROBE + "</body>"))
        proc = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={tmp}/profile",
                               page.as_uri()], capture_output=True, text=True, timeout=120)
    match = re.search(r"<title>IMAGES (\d+)/(\d+)</title>", proc.stdout)
    assert match, f"Chromium did not render the page: {proc.stderr[-2000:]}"
    return int(match.group(1)), int(match.group(2))


def dom(url: str, workdir: Path, budget_ms: int = 20000) -> str:
    """The page at ``url`` as Chromium's DOM after its scripts ran (a virtual-time budget)."""
    flags = [f for f in FLAGS if not f.startswith("--virtual-time-budget")]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        proc = subprocess.run([chromium(), *flags, f"--virtual-time-budget={budget_ms}",
                               f"--user-data-dir={tmp}/profile", url],
                              capture_output=True, text=True, timeout=180)
    assert proc.stdout.strip(), f"Chromium rendered nothing: {proc.stderr[-2000:]}"
    return proc.stdout
