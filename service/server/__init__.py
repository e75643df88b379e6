"""featureviz.server: the gRPC service (models, jobs, info), its scheduler and store.

Imports no torch, numpy, PIL, engine, importer or kernels (tests/service/test_service_batching.py checks the
source): everything that touches torch lives behind a worker (``featureviz.worker.api.Worker``: submit, cancel,
events back, plain data only).
"""

from featureviz.server.app import BackgroundServer
from featureviz.server.app import FeaturevizServer
from featureviz.server.app import create_server
from featureviz.server.app import serve_in_background
from featureviz.server.config import Limits
from featureviz.server.config import ServerConfig
from featureviz.server.config import parse_tokens

__all__ = [
    "BackgroundServer",
    "FeaturevizServer",
    "Limits",
    "ServerConfig",
    "create_server",
    "parse_tokens",
    "serve_in_background",
]
