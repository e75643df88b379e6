"""One layout for a render's files: the local command (tensors) and render --server (the server's PNG bytes) write
the same names and the same grid pixels (featureviz.outputs)."""

import io

import pytest

torch = pytest.importorskip("torch")

from PIL import Image  # noqa: E402

from featureviz.cli.remote import _grid_png  # noqa: E402
from featureviz.engine.images import png_bytes  # noqa: E402
from featureviz.engine.images import save_images  # noqa: E402
from featureviz.outputs import output_paths  # noqa: E402


def test_local_and_remote_grids_are_the_same_pixels(tmp_path):
    images = torch.randint(0, 256, (5, 3, 7, 9), generator=torch.Generator().manual_seed(0)).float() / 255
    local = save_images(images, tmp_path / "local", as_grid=True)
    assert local == [tmp_path / "local.png"]
    remote = _grid_png([png_bytes(image) for image in images])
    with Image.open(local[0]) as a, Image.open(io.BytesIO(remote)) as b:
        assert a.size == b.size == (3 * (9 + 2) + 2, 2 * (7 + 2) + 2)  # 3 columns, 2 rows, 2 px around each
        assert a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def test_output_names(tmp_path):
    assert output_paths(tmp_path / "a", 1) == [tmp_path / "a.png"]
    assert output_paths(tmp_path / "a.x", 2) == [tmp_path / "a.x_0.png", tmp_path / "a.x_1.png"]
    assert output_paths(tmp_path / "sub" / "b.png", 3, as_grid=True) == [tmp_path / "sub" / "b.png"]
    assert (tmp_path / "sub").is_dir()
    assert save_images(torch.zeros(2, 3, 4, 4), tmp_path / "c") == output_paths(tmp_path / "c", 2)
