"""cheapspot: LoRA fine-tuning and serving on spot GPUs in Kubernetes.

This package holds what the operator and the worker share: the contract
(:mod:`cheapspot.contract`), the object store (:mod:`cheapspot.store`) and the
command line (:mod:`cheapspot.cli`). The operator lives in ``cheapspot_operator``
(folder ``operator/``), the worker in ``cheapspot_worker`` (folder ``worker/``),
the local cluster in ``cheapspot_localcluster`` (folder ``e2e/``).
"""

__version__ = "0.1.0"
