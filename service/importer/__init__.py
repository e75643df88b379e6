"""ONNX bytes -> frozen torch module, input spec, layer catalog, truncation, cache (docs/ARCHITECTURE.md).

    >>> from featureviz.importer import import_model
    >>> model = import_model("resnet18.onnx")
    >>> model.input_spec.default_size, model.check.max_rel_err, model.logits
    >>> acts = model.truncate(["/layer2/layer2.0/relu/Relu"])(x)   # {name: tensor}, computes only what it needs
"""

from featureviz.importer.catalog import LayerInfo
from featureviz.importer.limits import ImportLimits
from featureviz.importer.model import ImportedModel
from featureviz.importer.model import import_model
from featureviz.importer.inputs import InputSpec
from featureviz.importer.inputs import Preprocess
from featureviz.importer.verify import CheckReport

__all__ = ["import_model", "ImportedModel", "InputSpec", "Preprocess", "LayerInfo", "CheckReport", "ImportLimits"]
