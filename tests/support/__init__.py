"""What the tests share besides fixtures, in one place (``tests/`` is on ``sys.path``: ``from support.serve import
ServeProcess``). Import the module you need; only ``models`` imports torch.

- :mod:`support.fake_worker`: :class:`FakeWorker`, a scripted worker behind the real server (no torch);
- :mod:`support.serve`: :class:`ServeProcess`, ``featureviz serve`` as a real subprocess;
- :mod:`support.certs`: :func:`make_certs`, a CA and server and client certificates made with openssl (the
  ``certs`` fixture of ``tests/conftest.py``);
- :mod:`support.models`: :class:`TinyNet` and :func:`export_onnx`, the small torch network the server and web
  tests upload as ONNX.
"""

__all__: list[str] = []
