"""Stoker: serve image generation from many Stable Diffusion models on Kubernetes.

Subpackages:
  stoker.api       the custom resources as pydantic models (the source of the CRDs)
  stoker.operator  the kopf operator: scheduling, warm replicas, failure handling
  stoker.agent     the per-pod agent: cache tiers, loader, runner, job loop
  stoker.sim       the fleet simulator that drives the real decision code
"""

__version__ = "0.1.0"
