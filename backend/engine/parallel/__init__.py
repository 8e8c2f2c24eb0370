"""Multi-GPU execution on torch.distributed: tensor parallelism now, laid out so pipeline stages can join.

    group.py      ParallelGroup: one process's rank, its process groups, all-reduce / logits gather
    sharding.py   which slice of each checkpoint tensor a rank holds; the per-rank model shape
    channel.py    rank 0 -> workers: each step's host-prepared inputs, broadcast over a gloo group
    workers.py    WorkerPool: start the K-1 worker processes, watch them, stop them (no orphans)
    worker.py     a worker process's main loop: the same ModelRunner, stepping in lockstep with rank 0
    runner.py     make_runner(): ModelRunner for tp == 1, the rank-0 side of a tensor-parallel group else
"""
