"""The optimization engine: objectives, parameterizations, transforms and the render loop (docs/ARCHITECTURE.md).

It sees only an imported model (``featureviz.importer.ImportedModel``) and plain specs; it knows nothing of gRPC.

    >>> from featureviz.engine import RenderSpec, render
    >>> result = render(model, RenderSpec(objective={"channel": {"layer": "/_blocks.5/_swish/Clip", "channel": 3}},
    ...                                   steps=256, size=128, batch=4))
    >>> result.images.shape, result.objective_end
"""

from featureviz.engine.images import grid
from featureviz.engine.images import load_image
from featureviz.engine.images import png_bytes
from featureviz.engine.images import save_images
from featureviz.engine.objectives import Activations
from featureviz.engine.objectives import Objective
from featureviz.engine.objectives import build as build_objective
from featureviz.engine.params import make_param
from featureviz.engine.render import CheckedSpec
from featureviz.engine.render import RenderResult
from featureviz.engine.render import RenderSpec
from featureviz.engine.render import render
from featureviz.engine.render import validate
from featureviz.engine.transforms import STANDARD_TRANSFORMS
from featureviz.engine.transforms import Transforms
from featureviz.engine.transforms import parse_transforms

__all__ = [
    "RenderSpec",
    "RenderResult",
    "CheckedSpec",
    "render",
    "validate",
    "Objective",
    "Activations",
    "build_objective",
    "make_param",
    "Transforms",
    "STANDARD_TRANSFORMS",
    "parse_transforms",
    "grid",
    "png_bytes",
    "save_images",
    "load_image",
]
