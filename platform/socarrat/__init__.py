"""Socarrat: text-to-image generation at cluster scale on Ray.

The library (this package) knows models and samplers; `deployments/`, `jobs/` and `cluster.yaml`
put it on a cluster.
"""

__version__ = "0.1.0"
