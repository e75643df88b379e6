"""featureviz.web: the web explorer, served by ``featureviz serve --http-port P`` from the gRPC server's process.

A thin aiohttp gateway over the gRPC API (:class:`WebGateway`) and a static single-page app (``static/``: plain
ES modules, no build step, nothing from a CDN): models (drag-and-drop upload, list, delete), a model's layer
catalog, a layer's first channels rendered as one batched job with live previews (server-sent events), a
channel with the render options of the CLI, ImageNet classes by name, the jobs, and the atlases (every unit of a
model's layers, live; ``static/js/atlas-pages.js`` is also the page of an exported atlas site). Every result
downloads as PNG with its spec JSON and the equivalent ``featureviz render`` command.
"""

__all__ = ["WebGateway"]


def __getattr__(name: str):
    # lazy: the gateway needs aiohttp (the server extra), while `featureviz atlas export` reads the payloads and the
    # static pages with the client install alone
    if name == "WebGateway":
        from featureviz.web.gateway import WebGateway

        return WebGateway
    raise AttributeError(f"module 'featureviz.web' has no attribute {name!r}")
