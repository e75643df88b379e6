"""Exemplar matching in a local render: ``featureviz render MODEL "L:C - 0.5*match:L:C@NAME" --match-images NAME=DIR``.

The ``match`` terms naming NAME resolve against the folder DIR: it is indexed through the model at the unit's layer
(one pass; cached like ``featureviz exemplars``' indexes, under the model cache's ``exemplars/``, so a second render
reads it), then the unit's top-k images give the targets (:func:`featureviz.engine.matching.index_targets`). Any
other name is NOT_FOUND. NAME defaults to the folder's name."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["local_match_targets", "INDEX_K"]

INDEX_K = 16  # examples the local index keeps per channel (a term's k above it indexes again with that k)


def local_match_targets(text: str, model, *, cache_dir: str | os.PathLike | None = None):
    """``[NAME=]DIR`` -> the ``RenderSpec.match_targets`` callable of a local render."""
    from featureviz.engine.exemplars import ImageFolder
    from featureviz.errors import InvalidSpec

    name, sep, folder = text.partition("=")
    if not sep:
        name, folder = "", text
    folder = Path(folder)
    if not folder.is_dir():
        raise InvalidSpec("match_images", f"{folder} is not a folder of images")
    name = name or os.path.basename(os.path.normpath(folder)) or "images"
    source = ImageFolder(folder)
    indexes: dict = {}

    def resolve(term, *, layer, match_layer, size, preprocess, path):
        from featureviz.engine.matching import index_targets
        from featureviz.errors import NotFound
        from featureviz.errors import echo

        if term.index != name:
            raise NotFound(f"{path}.index: no image folder named {echo(term.index)}; give --match-images "
                           f"{echo(term.index)}=DIR (known: {name})", reason="EXEMPLAR_INDEX_NOT_FOUND")
        k = max(INDEX_K, term.k)
        key = (layer, tuple(size), k)
        if key not in indexes:
            indexes[key] = _index(model, source, layer, tuple(size), preprocess, k, cache_dir)
        return index_targets(model, indexes[key], source.read, layer=layer, channel=term.channel, k=term.k,
                             match_layer=match_layer, size=size, preprocess=preprocess, path=path, index_name=name)

    return resolve


def _index(model, source, layer, size, preprocess, k, cache_dir):
    import sys

    from featureviz.cli.exemplars import cache_key
    from featureviz.cli.progress import ProgressBar
    from featureviz.engine.exemplars import ExemplarIndex
    from featureviz.engine.exemplars import build_index
    from featureviz.importer.cache import default_cache_dir

    folder = Path(cache_dir or default_cache_dir()) / "exemplars"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{cache_key(model.sha256, source.digest(), [layer], preprocess, size, k)}.npz"
    if path.exists():
        try:
            index = ExemplarIndex.load(path)
            if index.complete:
                return index
        except ValueError:
            pass
    bar = ProgressBar(f"index {len(source.names)} images for match", stream=sys.stderr)
    index = build_index(model, source, layers=[layer], k=k, size=size, preprocess=preprocess, state_path=path,
                        set_hash=path.stem, progress=lambda done, total: bar.update(done, total))
    bar.close(f"{index.indexed} indexed")
    return index
