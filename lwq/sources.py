"""Where a packed checkpoint comes from: a local folder, or a scheme served by a plugin.

``lwq.load("ckpt/")`` reads a local checkpoint. Any other ``SCHEME:/...``
source (``models:/NAME@champion`` of an MLflow registry) is resolved by the
object a package declares under the entry-point group ``lwq.sources`` with the
scheme's name. The pipeline declares ``models`` (``tasks.registry``), so the
library itself never imports a registry client. A source object has two
methods:

- ``pin(source) -> str``: what the source names now (``models:/NAME/7`` for
  ``models:/NAME@champion``), cheap, so a server can poll it for a moved alias;
- ``fetch(pinned) -> Path``: the checkpoint as a local folder, verified.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Protocol

from lwq.errors import ConfigError

GROUP = "lwq.sources"
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*):/")


class Source(Protocol):
    def pin(self, source: str) -> str: ...

    def fetch(self, pinned: str) -> Path: ...


class _Local:
    def pin(self, source: str) -> str:
        from lwq.pack.checkpoint import MANIFEST

        path = Path(source).expanduser()
        if not (path / MANIFEST).is_file():
            raise ConfigError(
                f"{source}: not a packed lwq checkpoint (no {MANIFEST}); give a checkpoint "
                "folder or a registry URI such as models:/NAME@champion"
            )
        return str(path.resolve())

    def fetch(self, pinned: str) -> Path:
        return Path(pinned)


def source_for(source: str) -> Source:
    """The resolver of ``source``'s scheme (a local path has none)."""
    m = _SCHEME.match(source)
    if m is None or len(m.group(1)) == 1:  # C:/ is a Windows drive, not a scheme
        return _Local()
    scheme = m.group(1)
    found = [ep for ep in entry_points(group=GROUP) if ep.name == scheme]
    if not found:
        known = sorted(ep.name for ep in entry_points(group=GROUP))
        raise ConfigError(
            f"{source}: no installed package reads {scheme}:/ sources (known: "
            f"{', '.join(known) or 'none'}); install lwq with its pipeline packages"
        )
    obj: Source = found[0].load()
    return obj


@dataclass(frozen=True)
class Loaded:
    model: Any  # a transformers causal LM: packed QuantLinear layers, or dequantised ones
    tokenizer: Any
    manifest: Any  # lwq.pack.manifest.Manifest
    source: str  # as given
    pinned: str  # what it named when loaded (models:/NAME/VERSION, a resolved folder)
    path: Path  # the local checkpoint folder


def load(source: str | Path, device: str = "cpu", packed: bool = True) -> Loaded:
    """A packed checkpoint as (model, tokenizer, manifest), from a folder or a registry URI.

    ``packed`` (the default) keeps the quantized layers packed and computes from
    their codes (``lwq.runtime``): the weights take about the checkpoint's bytes
    and decoding reads fewer of them; ``packed=False`` dequantises every layer
    into a float32 weight (the memory of the original model)."""
    from lwq.pack.checkpoint import load_quantized

    source = str(source)
    resolver = source_for(source)
    pinned = resolver.pin(source)
    path = resolver.fetch(pinned)
    model, tokenizer, manifest = load_quantized(path, device=device, packed_modules=packed)
    model.eval()
    return Loaded(model, tokenizer, manifest, source, pinned, path)
