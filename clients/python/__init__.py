"""featureviz.client: the thin Python client of the featureviz service (grpcio, grpcio-status, protobuf).

    from featureviz.client import Client, images, to_pil     # AsyncClient: the same calls on asyncio
"""

from featureviz.client.aio import AsyncClient
from featureviz.client.client import TERMINAL_STATES
from featureviz.client.client import Client
from featureviz.client.client import file_sha256
from featureviz.client.client import images
from featureviz.client.client import to_pil
from featureviz.client.errors import FeaturevizClientError
from featureviz.client.errors import from_rpc_error
from featureviz.v1 import featureviz_pb2 as pb

__all__ = ["AsyncClient", "Client", "FeaturevizClientError", "TERMINAL_STATES", "file_sha256", "from_rpc_error",
           "images", "pb", "to_pil"]
