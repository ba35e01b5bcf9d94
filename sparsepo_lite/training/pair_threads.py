"""A CPU micro-batch run as shards of its pairs, one thread each, instead of every op split across threads.

torch splits each op of a step over its threads (OpenMP), so a CPU step of the sentiment recipe
opens ~10,000 parallel regions, each ending at a barrier where every thread waits for the slowest.
Alone that costs little; beside other busy processes a preempted thread stalls its siblings at every
barrier. Here each of ``shards`` threads runs the whole forward and backward of a few pairs with torch
on ``threads // shards`` threads (one on a 2-core machine: no barrier at all); the shards meet three
times a step: after the reference passes, after the losses, after the gradients.

The result is the unsharded step's up to rounding: the loss is a mean over pairs, so the step's loss
and gradient are the shards' weighted by their pairs, summed in shard order (run to run the same
bits). Every thread-local setting a shard needs (grad mode, autocast) is entered in its own thread.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import sys
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch

from ..models import embedding_rows, lm_head, reference_model, unwrap
from ..objective import LossConfig, check_batch, compute_loss, merge_metrics, online_reference
from ..ops import DEFAULT_CHUNK_BYTES, default_chunk_size
from ..refcache import keys, select_pairs


def pair_ranges(pairs: int, shards: int) -> List[Tuple[int, int]]:
    """``shards`` contiguous ranges of ``pairs`` pairs, sizes differing by at most one (no empty one)."""
    shards = max(1, min(shards, pairs))
    cuts = [pairs * i // shards for i in range(shards + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


#: The name the pair threads carry where the OS keeps thread names (Linux: ``top -H``, ``ps -L``,
#: /proc/<pid>/task/<tid>/comm), so that a profiler or bench/bench_thread_share.py can tell them from
#: torch's OpenMP threads. At most 15 bytes.
THREAD_NAME = "sparsepo-pairs"
_PR_SET_NAME = 15


def name_os_thread(name: str) -> None:
    """Name the calling thread at the OS level (Linux; elsewhere nothing happens). Python's own thread
    names are not visible outside the interpreter."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):  # no libc with prctl: the name is a convenience only
        pass


class PairThreads:
    """A pool of ``threads`` CPU threads that runs a function on each shard of a batch at once.

    Each call runs torch on ``threads // shards`` threads inside each shard, never more than the
    caller's own count (a load guard's one thread means one per shard), and restores the caller's
    count afterwards (``torch.set_num_threads`` changes process-wide settings too, such as MKL's).
    """

    def __init__(self, threads: int):
        if threads < 2:
            raise ValueError(f"PairThreads needs at least 2 threads, got {threads}")
        self.threads = threads
        self._pool = ThreadPoolExecutor(
            threads, thread_name_prefix=THREAD_NAME, initializer=name_os_thread, initargs=(THREAD_NAME,)
        )

    def map(self, fn: Callable, items: Sequence) -> list:
        """``[fn(item) for item in items]``, one item per thread. Every item finishes before this
        returns or raises the first item's error: no shard may still be running the model when the
        caller switches its adapter back or restores the thread count."""
        restore = torch.get_num_threads()
        inner = max(1, min(self.threads // len(items), restore))

        def run(item):
            torch.set_num_threads(inner)
            return fn(item)

        try:
            futures = [self._pool.submit(run, item) for item in items]
            wait(futures)
            return [f.result() for f in futures]
        finally:
            torch.set_num_threads(restore)

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "PairThreads":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ShardedLoss:
    """One batch's loss run as pair shards: ``loss`` [] (the batch's mean over pairs, no graph),
    ``metrics`` (the batch's, merged), and each shard's loss (with its graph) and weight, which
    :func:`add_gradients` backpropagates."""

    def __init__(self, losses: List[torch.Tensor], weights: List[float], metrics: Dict[str, float]):
        self.losses, self.weights, self.metrics = losses, weights, metrics
        self.loss = sum(w * loss.detach() for w, loss in zip(weights, losses))


def sharded_loss(
    pool: PairThreads,
    model,
    batch: Dict[str, torch.Tensor],
    config: LossConfig,
    *,
    context: Callable[[], ContextManager] = contextlib.nullcontext,
) -> ShardedLoss:
    """:func:`compute_loss` of ``batch`` as ``pool.threads`` shards of its pairs (fewer if it has
    fewer pairs). ``context``: entered around each shard's forward in its own thread (autocast,
    ``torch.no_grad``). The online reference runs first for every shard at once, inside one switch of
    the model to its reference (the adapter switch is module state: it cannot change per thread)."""
    # checked here, so that an error names the batch's rows, not a shard's
    ids, _, positions, _ = check_batch(batch, embedding_rows(model))
    per_row = positions.response.sum(dim=1)
    pairs = ids.shape[0] // 2
    ranges = pair_ranges(pairs, pool.threads)
    shards = [select_pairs(batch, a, b) for a, b in ranges]
    tokens = [int(per_row[a:b].sum() + per_row[pairs + a : pairs + b].sum()) for a, b in ranges]
    if config.chunk_size is None:  # the op's chunk buffers are per call: the shards share one budget
        head = lm_head(unwrap(model))
        config = copy.copy(config)  # not dataclasses.replace: the caller's settings are not checked again
        config.chunk_size = default_chunk_size(
            max(tokens), head.shape[0], head.dtype, exact=True, budget_bytes=DEFAULT_CHUNK_BYTES // len(shards)
        )
    refs: List[Optional[object]] = [None] * len(shards)
    if keys.batch_key(keys.LABEL_LOGP) not in batch:
        with reference_model(model, config.ref_model) as ref:

            def reference(shard):
                with context():
                    return online_reference(model, shard, config, ref_model=ref)

            refs = pool.map(reference, shards)

    def loss(job):
        shard, ref = job
        with context():
            return compute_loss(model, shard, config, reference=ref)

    out = pool.map(loss, list(zip(shards, refs)))
    metrics = merge_metrics([(m, b - a, n) for (_, m), (a, b), n in zip(out, ranges, tokens)])
    return ShardedLoss([loss for loss, _ in out], [(b - a) / pairs for a, b in ranges], metrics)


def add_gradients(pool: PairThreads, result: ShardedLoss, params: List[torch.nn.Parameter], scale: float) -> None:
    """Add ``scale`` times the gradient of ``result.loss`` to each of ``params``' ``.grad``: each shard
    backpropagates in its own thread; the shards' gradients are summed in shard order."""

    def grads(job):
        loss, weight = job
        try:
            return torch.autograd.grad(loss * (weight * scale), params, allow_unused=True)
        except RuntimeError as exc:
            if "checkpoint" not in str(exc).lower():
                raise
            raise RuntimeError(
                f"{exc}\nThe pair shards backpropagate with torch.autograd.grad, which reentrant gradient "
                "checkpointing does not support: use gradient_checkpointing_kwargs={'use_reentrant': False} "
                "or --cpu_pair_threads false"
            ) from exc

    per_shard = pool.map(grads, list(zip(result.losses, result.weights)))
    for i, p in enumerate(params):
        parts = [g[i] for g in per_shard if g[i] is not None]
        if not parts:
            continue
        total = parts[0]
        for g in parts[1:]:
            total = total + g
        if p.grad is None:
            p.grad = total
        else:
            p.grad += total
