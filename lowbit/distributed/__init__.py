"""Tensor parallelism plumbing below the layers: who holds which slice (partition.py), the
process group a rank talks through (group.py) and the local shared-memory all-reduce
(shm_allreduce.py). Nothing here knows about models or quantization: layers/ and models/ use it.
"""
