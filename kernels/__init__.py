"""Pure tensor operations for the hot paths outside the model.

Each operation has one API (the signature of its torch reference in ``reference.py``); the Triton
implementation is chosen by device and by ``FEATUREVIZ_KERNELS=auto|torch|triton``.
"""

from .reference import affine_resample
from .reference import rfft2_freqs
from .reference import spectrum_to_image

__all__ = ["spectrum_to_image", "affine_resample", "rfft2_freqs"]
