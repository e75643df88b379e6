"""Kept for callers of the first releases: the proto <-> spec codec is :mod:`featureviz.codec` (torch-free, shared
by the client, the server, the worker and the web gateway)."""

from featureviz.codec import *  # noqa: F401,F403
from featureviz.codec import __all__  # noqa: F401
