"""The PNG writer (``featureviz.engine.images.encode_png``, behind every result and preview image): what any decoder
reads back is the exact pixels, grey and RGB, at odd and one-pixel sizes and past the Up filter's wrap-around; the
server's own PNG checker (the one uploads go through) takes its files; the thumbnail path keeps its size; bad arrays
are refused."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from featureviz.engine.images import encode_png
from featureviz.engine.images import png_bytes
from featureviz.engine.images import to_uint8
from featureviz.images import image_info


@pytest.mark.parametrize("shape", [(3, 1, 1), (1, 1, 1), (3, 5, 3), (1, 7, 4), (3, 32, 32), (3, 61, 200),
                                   (1, 224, 224)])
def test_any_decoder_reads_back_the_exact_pixels(shape):
    image = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    data = png_bytes(image)
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    assert decoded.mode == ("RGB" if shape[0] == 3 else "L") and decoded.size == (shape[2], shape[1])
    np.testing.assert_array_equal(np.asarray(decoded), to_uint8(image))
    info = image_info(data, max_side=4096)  # the server's own checker of uploaded files takes it too
    assert (info.width, info.height) == (shape[2], shape[1])


def test_the_up_filter_wraps_modulo_256_and_the_stream_is_the_one_zlib_inflates():
    rows = np.array([[0, 255, 7], [255, 0, 7], [1, 254, 0]], np.uint8)  # every difference wraps
    data = encode_png(np.repeat(rows[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(data)))[:, :, 1], rows)
    idat = data.index(b"IDAT")
    raw = zlib.decompress(data[idat + 4: idat + 4 + int.from_bytes(data[idat - 4: idat], "big")])
    assert raw[0] == 2 and len(raw) == 3 * (1 + 3 * 3)  # the Up filter on every row


def test_a_thumbnail_fits_max_side_and_keeps_the_aspect():
    data = png_bytes(torch.rand(3, 300, 100), max_side=64)
    assert Image.open(io.BytesIO(data)).size == (21, 64)
    assert Image.open(io.BytesIO(png_bytes(torch.rand(3, 30, 10), max_side=64))).size == (10, 30)


@pytest.mark.parametrize("array", [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4, 4), np.uint8),
                                   np.zeros((4,), np.uint8), np.zeros((0, 4, 3), np.uint8)])
def test_anything_but_an_8_bit_grey_or_rgb_array_is_refused(array):
    with pytest.raises(ValueError, match="uint8 array"):
        encode_png(array)
