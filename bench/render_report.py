"""Render a report.html to a PNG screenshot with headless Chromium (no network, throwaway profile).

    python bench/render_report.py OUT/report.html OUT/report.png [--width 1280] [--height 4000]

Exit status 0 with the PNG written; 2 when no Chromium is installed (``apt-get install chromium``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def find_chromium() -> str | None:
    for c in CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    return shutil.which("chromium") or shutil.which("chromium-browser")


def render(html_path: str | os.PathLike, png_path: str | os.PathLike, width: int = 1280, height: int = 4000,
           timeout: float = 180.0, chromium: str | None = None) -> Path:  # fmt: skip
    """Screenshot ``html_path`` (a local file) into ``png_path``; raises on failure."""
    exe = chromium or find_chromium()
    if exe is None:
        raise FileNotFoundError("no Chromium found (apt-get install chromium)")
    html_path, png_path = Path(html_path).resolve(), Path(png_path).resolve()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png_path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [
            exe,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-dev-shm-usage",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={png_path}",
            html_path.as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if not png_path.is_file() or png_path.stat().st_size == 0:
        raise RuntimeError(f"Chromium wrote no screenshot (rc {proc.returncode}):\n{proc.stderr[-2000:]}")
    return png_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("html")
    p.add_argument("png")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=4000)
    p.add_argument("--timeout", type=float, default=180.0)
    args = p.parse_args(argv)
    if find_chromium() is None:
        print("no Chromium found: apt-get install chromium", file=sys.stderr)
        return 2
    out = render(args.html, args.png, args.width, args.height, args.timeout)
    print(f"screenshot written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
