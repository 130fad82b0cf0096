"""Tensor-parallel execution: rank 0 is the engine's own process (scheduler, block manager,
sampler: never duplicated); ranks 1..N-1 are worker processes lowbit starts itself (vLLM's "mp"
executor style) that hold their slice of the weights and of the KV pool and run each step the
driver broadcasts. launch.py starts and watches the workers, worker.py is their main loop.
"""
