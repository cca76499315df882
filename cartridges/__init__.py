"""Cartridges on Kubernetes: the shared library (API models, artifact format, object store, base models)."""

__version__ = "0.1.0"
