"""Decoding policy: EXIF orientation, RGB conversion, one clear error type for bad files."""

import io

import numpy as np
import pytest
from PIL import Image

from netvlad.errors import ImageError
from netvlad.imageio import find_photos, load_image


def _jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def test_exif_orientation_is_applied(tmp_path):
    wide = Image.fromarray(np.zeros((20, 40, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "rotated.jpg"
    path.write_bytes(_jpeg_bytes(wide, exif=exif.tobytes()))
    assert load_image(path).size == (20, 40)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16"])
def test_any_mode_becomes_rgb(mode, tmp_path):
    image = Image.new(mode if mode != "I;16" else "I;16", (8, 6))
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (8, 6)


def test_bytes_paths_and_pil_images_give_the_same_pixels(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (10, 12, 3), dtype=np.uint8))
    path = tmp_path / "a.png"
    image.save(path)
    a, b, c = load_image(path), load_image(path.read_bytes()), load_image(image)
    assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"this is a text file, not a photo", "not an image"),
        (None, "corrupt or truncated"),  # filled in below: a JPEG cut in half
    ],
)
def test_bad_files_raise_image_error_with_reason(content, reason, tmp_path):
    if content is None:
        full = _jpeg_bytes(Image.fromarray(np.full((64, 64, 3), 128, np.uint8)))
        content = full[: len(full) // 2]
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=reason):
        load_image(path)
    with pytest.raises(ImageError, match=reason):
        load_image(content)


def test_missing_file_and_decompression_bomb(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        load_image(tmp_path / "nope.jpg")
    big = tmp_path / "big.png"
    Image.new("L", (4000, 3000)).save(big)  # 12 Mpx, tiny file
    with pytest.raises(ImageError, match="more than the limit"):
        load_image(big, max_pixels=10_000_000)
    assert load_image(big, max_pixels=12_000_000).size == (4000, 3000)


def test_find_photos_walks_folders_skipping_hidden(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ["a.jpg", "sub/b.PNG", "sub/notes.txt", ".hidden/c.jpg", ".d.jpg"]:
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_photos([tmp_path])]
    assert found == ["a.jpg", "sub/b.PNG"]
    with pytest.raises(ImageError, match="no such file"):
        find_photos([tmp_path / "missing"])


def test_large_jpegs_decode_at_a_reduced_scale_with_the_same_content(real_photos):
    from netvlad.transforms import Preprocess

    photo = load_image(real_photos[0])
    big = photo.resize((photo.width * 2, photo.height * 2))  # a camera-sized photo
    data = _jpeg_bytes(big, quality=92)
    reduced = load_image(data, reduce_to=320)
    assert 320 <= max(reduced.size) < 640
    preprocess = Preprocess("grey", max_side=320)
    full, fast = preprocess(load_image(data)), preprocess.load(data)
    assert full.shape == fast.shape
    assert float((full - fast).abs().mean()) < 0.1  # standardised pixels: same picture
    # Rotated by EXIF: the long side is the same in either orientation.
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = load_image(_jpeg_bytes(big, quality=92, exif=exif.tobytes()), reduce_to=320)
    assert rotated.size == reduced.size[::-1]
    # Formats without scaled decoding (PNG) are shrunk by a whole factor right after decoding,
    # with the same content; a photo not much larger than asked is decoded in full.
    png = io.BytesIO()
    big.save(png, format="PNG")
    small_png = load_image(png.getvalue(), reduce_to=320)
    assert 320 <= max(small_png.size) < 640
    full_png = preprocess(load_image(png.getvalue()))
    assert float((full_png - preprocess(small_png)).abs().mean()) < 0.1
    assert load_image(png.getvalue(), reduce_to=max(big.size) // 2 + 1).size == big.size
    assert load_image(data, reduce_to=max(big.size) // 2 + 1).size == big.size
