"""Fetch the project's real photographs from its approved sources into a folder (`make photos`).

Usage: ``python tools/fetch_photos.py DEST [--no-debian] [--max-side 1600]``. Tests and the demo
read the photos from that folder (`data/photos` by default); the library never fetches anything.

Sources (and only these): photos in the Debian packages `lomiri-wallpapers-16.04` and
`lomiri-wallpapers-20.04` (fetched with `apt-get download` + `dpkg -x`, never installed; the
third approved package, `ukui-wallpapers`, holds graphics only), the photos bundled with
scikit-image and scikit-learn's `load_sample_images()`. Each photo is written into one folder as
`<source>-<name>.jpg`, its long side at most `max_side` pixels, with `manifest.json` recording
where every file came from; the Debian packages' copyright files are copied next to them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageOps

MANIFEST = "manifest.json"
JPEG_QUALITY = 92

# Debian package → photographs in /usr/share/backgrounds (the other files are graphics).
DEBIAN_PHOTOS: dict[str, tuple[str, ...]] = {
    "lomiri-wallpapers-16.04": (
        "Bridge_by_Sander_Klootwijk.jpg",
        "Dragonfly_by_Bolly.jpg",
        "Picture_0B_by_freespace.jpg",
        "Picture_1A_by_freespace.jpg",
        "Wine_by_Jakkub_Mede.jpg",
        "aitzgorri_by_Aitzol_Berasategi.jpg",
        "analogpattern_by_Peter_Nerlich.jpg",
        "free_by_Peter_Nerlich.jpg",
        "friends_by_Aitzol_Berasategi.jpg",
        "greentock_by_Peter_Nerlich.jpg",
        "life_by_Aitzol_Berasategi.jpg",
        "picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "seeding_by_Clements_Engelhardt.jpg",
        "sunset_by_Aitzol_Berasategi.jpg",
    ),
    "lomiri-wallpapers-20.04": ("Kleiber_by_Lukas_Baubkus.jpg",),
}
SKIMAGE_PHOTOS = (
    "astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "motorcycle_right",
    "brick", "grass", "gravel", "camera",
)
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")


def fetch_photos(dest: Path, debian: bool = True, max_side: int = 1600) -> list[Path]:
    """Write the approved photos into `dest` as JPEG (long side ≤ `max_side` px) and return the
    paths of every photo in the collection, sorted. Idempotent: files already listed in the manifest with the same `max_side` are
    kept, so a second call writes nothing. When the Debian packages cannot be downloaded (no
    network) a warning is issued and only the bundled photos are collected."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    manifest_path = dest / MANIFEST
    old = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    kept = old.get("photos", []) if old.get("max_side") == max_side else []
    entries = {e["file"]: e for e in kept if (dest / e["file"]).is_file()}
    before = dict(entries)

    bundled = [f"skimage-{n}.jpg" for n in SKIMAGE_PHOTOS] + [f"sklearn-{Path(n).stem}.jpg" for n in SKLEARN_PHOTOS]
    from_debian = [f"debian-{Path(n).stem}.jpg" for names in DEBIAN_PHOTOS.values() for n in names]
    if not entries.keys() >= set(bundled):
        for name, source, image in _bundled_photos():
            entries[name] = _export(image, dest / name, source, max_side)
    if debian and not entries.keys() >= set(from_debian):
        with tempfile.TemporaryDirectory(prefix="netvlad-debs-") as tmp:
            try:
                for name, source, image in _debian_photos(Path(tmp), dest):
                    entries[name] = _export(image, dest / name, source, max_side)
            except _DownloadError as exc:
                warnings.warn(
                    f"could not fetch the Debian wallpaper photos ({exc}); "
                    "collected the scikit-image and scikit-learn photos only",
                    stacklevel=2,
                )
    if entries != before or not manifest_path.is_file():
        manifest = {"max_side": max_side, "photos": [entries[k] for k in sorted(entries)]}
        tmp_path = manifest_path.with_suffix(".json.tmp")
        tmp_path.write_text(json.dumps(manifest, indent=1) + "\n")
        tmp_path.replace(manifest_path)
    return sorted(dest / name for name in entries)


class _DownloadError(RuntimeError):
    """`apt-get download` or `dpkg -x` failed."""


def _export(image: Image.Image, path: Path, source: str, max_side: int) -> dict:
    """Save `image` as JPEG at `path`, shrunk so its long side is ≤ `max_side`; return the
    manifest entry (file, source, original and saved size, sha256)."""
    original = image.size
    image = ImageOps.exif_transpose(image)
    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    tmp = path.with_suffix(".tmp")
    image.save(tmp, format="JPEG", quality=JPEG_QUALITY)
    tmp.replace(path)
    return {
        "file": path.name,
        "source": source,
        "original_size": list(original),
        "size": list(image.size),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def _bundled_photos() -> Iterator[tuple[str, str, Image.Image]]:
    """(file name, source description, image) for the scikit-image and scikit-learn photos."""
    import skimage
    import skimage.data
    from sklearn.datasets import load_sample_images

    stereo = dict(zip(("motorcycle_left", "motorcycle_right"), skimage.data.stereo_motorcycle()[:2]))
    for name in SKIMAGE_PHOTOS:
        array = stereo[name] if name in stereo else getattr(skimage.data, name)()
        yield f"skimage-{name}.jpg", f"scikit-image {skimage.__version__} data.{name}", Image.fromarray(array)
    samples = load_sample_images()
    for filename, array in zip(samples.filenames, samples.images):
        name = Path(filename).name
        if name in SKLEARN_PHOTOS:
            yield f"sklearn-{Path(name).stem}.jpg", f"scikit-learn load_sample_images {name}", Image.fromarray(array)


def _debian_photos(workdir: Path, dest: Path) -> Iterator[tuple[str, str, Image.Image]]:
    """Download and unpack the approved wallpaper packages in `workdir` (no install), copy their
    copyright files into `dest`, and yield (file name, source, image) for their photographs."""
    packages = sorted(DEBIAN_PHOTOS)
    _run(["apt-get", "download", *packages], cwd=workdir)
    for package in packages:
        debs = sorted(workdir.glob(f"{package}_*.deb"))
        if not debs:
            raise _DownloadError(f"apt-get download produced no .deb for {package}")
        tree = workdir / package
        _run(["dpkg", "-x", str(debs[0]), str(tree)], cwd=workdir)
        version = debs[0].name.split("_")[1]
        copyright_file = tree / "usr/share/doc" / package / "copyright"
        if copyright_file.is_file():
            shutil.copyfile(copyright_file, dest / f"debian-{package}.copyright")
        for name in DEBIAN_PHOTOS[package]:
            with Image.open(tree / "usr/share/backgrounds" / name) as image:
                image.load()
                yield f"debian-{Path(name).stem}.jpg", f"debian {package} {version} /usr/share/backgrounds/{name}", image


def _run(command: list[str], cwd: Path) -> None:
    try:
        subprocess.run(command, cwd=cwd, check=True, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as exc:
        raise _DownloadError(f"{command[0]} not found") from exc
    except subprocess.CalledProcessError as exc:
        lines = [line for line in (exc.stderr or "").splitlines() if line.startswith("E:")]
        raise _DownloadError(f"{' '.join(command[:2])} failed: {' '.join(lines) or exc.stderr.strip()}") from exc
    except subprocess.TimeoutExpired as exc:
        raise _DownloadError(f"{' '.join(command[:2])} timed out") from exc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dest", type=Path, help="folder to collect the photos in (created if missing)")
    parser.add_argument("--no-debian", dest="debian", action="store_false",
                        help="only the scikit-image and scikit-learn photos, not the Debian wallpaper packages")
    parser.add_argument("--max-side", type=int, default=1600, help="longest side of the stored photos, pixels")
    args = parser.parse_args()
    if args.dest.exists() and not args.dest.is_dir():
        parser.error(f"{args.dest} is a file, not a folder")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        paths = fetch_photos(args.dest, debian=args.debian, max_side=args.max_side)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    print(f"{len(paths)} photos in {args.dest}")


if __name__ == "__main__":
    main()
