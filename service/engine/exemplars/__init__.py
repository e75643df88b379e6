"""Dataset examples: the exemplar index (one streaming, resumable pass keeping every channel's top images) and
receptive-field crops. Knows nothing of gRPC; see docs/ARCHITECTURE.md, "exemplars"."""

from .fields import ReceptiveField
from .fields import positive_copy
from .fields import receptive_field
from .index import DEFAULT_K
from .index import MAX_K
from .index import ORDERS
from .index import Exemplar
from .index import ExemplarIndex
from .index import ImageFiles
from .index import ImageFolder
from .index import ImageSource
from .index import IndexPass
from .index import build_index
from .index import index_layers
from .index import score_images
from .state import SKETCH_ERROR
from .state import LayerState
from .state import reduce_activation

__all__ = ["ReceptiveField", "positive_copy", "receptive_field", "DEFAULT_K", "MAX_K", "ORDERS", "Exemplar",
           "ExemplarIndex", "ImageFiles", "ImageFolder", "ImageSource", "IndexPass", "build_index", "index_layers", "score_images",
           "SKETCH_ERROR",
           "LayerState", "reduce_activation"]
