"""The model's input never shrinks an image that fits it (issue 11: the resize to the model's input size)."""

import torch

from featureviz.engine.transforms import Pad
from featureviz.engine.transforms import COMPOSED_TRANSFORMS
from featureviz.engine.transforms import STANDARD_TRANSFORMS
from featureviz.engine.transforms import Transforms
from featureviz.importer import Preprocess

IDENTITY = Preprocess(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def test_the_model_input_never_shrinks_an_image_that_fits():
    """An image as large as a fixed model input is shown at its own pixels (a window of the padded canvas), not
    shrunk with its pad (x0.9 at 224 + 2x12: aliasing); a smaller canvas is still upsampled whole, a larger image
    fills the input."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, 3, 24, 24, generator=g)
    same = Transforms([Pad(3)], (24, 24), (24, 24), IDENTITY)(image, None)
    torch.testing.assert_close(same, image, atol=1e-5, rtol=0)  # 1:1, no resampling at all
    small = Transforms([Pad(3)], (12, 12), (24, 24), IDENTITY)(image[..., :12, :12], None)
    assert torch.allclose(small[..., :2, :], torch.full_like(small[..., :2, :], 0.5), atol=0.02)  # the pad is seen
    big = Transforms([Pad(3)], (24, 24), (16, 16), IDENTITY)(torch.full((1, 3, 24, 24), 0.2), None)
    torch.testing.assert_close(big, torch.full_like(big, 0.2))  # the image fills the input, the pad is outside


def test_an_image_at_the_model_size_sees_its_pad_only_through_the_random_steps():
    """224 px on a 224 input: the centred geometry is the identity; jitter, zoom-out and rotation reach the pad."""
    image = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    for stack in (STANDARD_TRANSFORMS, COMPOSED_TRANSFORMS):
        plain = Transforms(stack, (224, 224), (224, 224), IDENTITY).centred()
        torch.testing.assert_close(plain(image, None), image, atol=1e-4, rtol=0)  # float32 grid coordinates
    t = Transforms(COMPOSED_TRANSFORMS, (224, 224), (224, 224), IDENTITY)
    theta = t.theta(64, torch.Generator().manual_seed(3))
    # the linear part is (1/s) R(-angle) on a 1:1 view: |det| = 1/s^2 in [1/1.1^2, 1/0.9^2]
    det = torch.det(theta[:, :, :2])
    assert ((det > 1 / 1.1 ** 2 - 1e-4) & (det < 1 / 0.9 ** 2 + 1e-4)).all()
