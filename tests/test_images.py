"""Image reading: every layout a user may hand us becomes [H, W, 3] uint8 RGB, or a typed error."""
import numpy as np
import pytest
from PIL import Image

from idglow_core.errors import ImageReadError, InputError
from idglow_core.images import load_image, save_image_atomic, to_rgb_uint8


def test_rgb_jpeg(data_dir):
    img = load_image(data_dir / "obama.jpg")
    assert img.dtype == np.uint8 and img.shape == (400, 320, 3)


def test_grayscale_is_replicated(tmp_path):
    Image.fromarray(np.full((4, 5), 77, np.uint8), "L").save(tmp_path / "g.png")
    img = load_image(tmp_path / "g.png")
    assert img.shape == (4, 5, 3) and (img == 77).all()


def test_rgba_transparent_pixels_become_white(tmp_path):
    arr = np.zeros((2, 2, 4), np.uint8)
    arr[0, 0] = (10, 20, 30, 255)  # opaque pixel kept
    arr[1, 1] = (10, 20, 30, 0)  # transparent pixel -> white background
    Image.fromarray(arr, "RGBA").save(tmp_path / "a.png")
    img = load_image(tmp_path / "a.png")
    assert img[0, 0].tolist() == [10, 20, 30] and img[1, 1].tolist() == [255, 255, 255]


def test_16_bit_grayscale_is_scaled(tmp_path):
    Image.fromarray(np.full((3, 3), 65535, np.uint16)).save(tmp_path / "d.png")
    assert (load_image(tmp_path / "d.png") == 255).all()


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (6, 2), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "r.jpg", exif=exif)
    assert load_image(tmp_path / "r.jpg").shape == (6, 2, 3)


def test_missing_and_non_image_files(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "text.jpg").write_text("hello, not a picture")
    with pytest.raises(ImageReadError, match="not an image in a format"):
        load_image(tmp_path / "text.jpg")
    (tmp_path / "trunc.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(ImageReadError):
        load_image(tmp_path / "trunc.png")


def test_to_rgb_uint8_layouts():
    assert to_rgb_uint8(np.full((2, 2), 1.0)).tolist() == [[[255] * 3] * 2] * 2
    assert to_rgb_uint8(np.zeros((2, 2, 1), np.uint8)).shape == (2, 2, 3)
    with pytest.raises(InputError, match="HWC"):
        to_rgb_uint8(np.zeros((3, 2, 2, 2)))


def test_save_image_atomic(tmp_path):
    out = save_image_atomic(np.full((3, 4, 3), 9, np.uint8), tmp_path / "sub" / "x.png")
    assert load_image(out).tolist() == np.full((3, 4, 3), 9, np.uint8).tolist()
    assert [p.name for p in out.parent.iterdir()] == ["x.png"]


def _png_header(path, width, height):
    """A PNG whose header claims ``width x height`` (8-bit grey) with no pixel data: what a bomb looks like."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))
    return path


def test_decompression_bombs_are_refused_from_the_header(tmp_path):
    from idglow_core.errors import ImageTooLargeError
    from idglow_core.images import MAX_IMAGE_PIXELS, check_image

    # 195 MP: above Pillow's own hard limit (its DecompressionBombError becomes the typed error)
    bomb = _png_header(tmp_path / "bomb.png", 15000, 13000)
    for fn in (load_image, check_image):
        with pytest.raises(ImageTooLargeError, match="above the limit of 80 MP"):
            fn(bomb)
    # 100 MP: Pillow would only warn and decode it; the documented limit refuses it
    big = _png_header(tmp_path / "big.png", 10000, 10000)
    assert 10000 * 10000 > MAX_IMAGE_PIXELS
    with pytest.raises(ImageTooLargeError, match=r"100\.0 MP.*MAX_IMAGE_PIXELS"):
        load_image(big)
    with pytest.raises(ImageTooLargeError):
        load_image(_png_header(tmp_path / "s.png", 30, 30), max_pixels=800)
    assert issubclass(ImageTooLargeError, ImageReadError)


def test_folder_and_truncated_files_name_the_real_cause(tmp_path, data_dir):
    from idglow_core.images import check_image

    (tmp_path / "shots.jpg").mkdir()
    with pytest.raises(ImageReadError, match="is a folder, not an image file") as err:
        load_image(tmp_path / "shots.jpg")
    assert "not found" not in str(err.value)
    data = (data_dir / "obama.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    for fn in (load_image, check_image):
        with pytest.raises(ImageReadError, match="truncated") as err:
            fn(tmp_path / "cut.jpg")
        assert "Use a JPEG" not in str(err.value) and "Re-export or re-copy" in str(err.value)
    assert check_image(data_dir / "obama.jpg") == (320, 400)


def test_one_path_or_one_image_where_a_list_is_expected_is_named(tmp_path):
    from idglow_core.faces import reference_faces
    from idglow_core.images import as_image_list
    from idglow_core.testing import OneFaceAnalyzer

    with pytest.raises(InputError, match=r"reference images must be a list .* got a single path 'me.jpg'"):
        reference_faces(OneFaceAnalyzer(), "me.jpg")  # was split into 'm', 'e', ... -> "not found: 'm'"
    with pytest.raises(InputError, match="single image"):
        as_image_list(np.zeros((4, 4, 3), np.uint8))
    assert len(as_image_list(np.zeros((2, 4, 4, 3), np.uint8))) == 2 and as_image_list(("a", "b")) == ["a", "b"]
