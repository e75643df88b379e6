"""featureviz: feature visualization by optimization, as a shared GPU service.

Subpackages (each folder of the repository is mapped into this one namespace):

- ``featureviz.importer`` (``service/importer``): ONNX bytes -> verified torch module, input spec, layer catalog.
- ``featureviz.engine``   (``service/engine``): objectives, parameterizations, transforms, the render loop.
- ``featureviz.server``   (``service/server``): gRPC servicers, job scheduler, storage.
- ``featureviz.kernels``  (``kernels/``): fused Triton kernels and their torch references.
- ``featureviz.client``   (``clients/python``): the thin Python client (grpcio + protobuf only).
- ``featureviz.v1``       (``protos/featureviz/v1``): the versioned gRPC contract and its generated code.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
