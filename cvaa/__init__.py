"""cvaa: CVAA-GAN CT reconstruction from biplanar X-rays (arXiv 2408.09736).

The library under ``cvaa/`` imports neither Ray nor MLflow except in ``cvaa.distributed`` and
``cvaa.tracking``: models, data transforms and metrics stay usable anywhere.
"""

__version__ = "0.1.0"
