"""Everything that imports Ray: the edge between cvaa's plain-torch core and a cluster.

- :mod:`~cvaa.distributed.cluster`: joining or starting Ray, the workers' environment, a
  quiet console.
- :mod:`~cvaa.distributed.pipeline`: Ray Data preprocessing (CT archive -> prepared dataset)
  and the embedded default's phantoms.
- :mod:`~cvaa.distributed.training`: the driver of a training run (TorchTrainer, then
  evaluation and registration as separate steps).
- :mod:`~cvaa.distributed.worker`: the per-rank training loop.
- :mod:`~cvaa.distributed.sweep`: Ray Tune sweeps.
- :mod:`~cvaa.distributed.evaluate`: Table I and Fig. 2 for registered models (Ray Data
  batch inference for large splits).
- :mod:`~cvaa.distributed.compat`: the few private Ray internals cvaa relies on, each
  checked against the installed Ray version.
"""
