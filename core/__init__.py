"""gem: relation-aware disentangled representation learning (GEM) with pluggy plugins."""

from gem.hooks import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "__version__"]
