"""Distributed data parallel helpers for ``torchrun`` (gloo on CPU, nccl on GPU).

Launch any medsegkit training entry point with torchrun; these helpers read torchrun's environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``)::

    torchrun --nproc_per_node 2 -m medsegkit train --sample ...                 # one machine
    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 4 \\
             --rdzv_backend c10d --rdzv_endpoint HOST:29400 -m medsegkit train ...  # several machines

Rules the helpers implement: one process per device; ``DistributedSampler`` shards the data;
BatchNorm becomes ``SyncBatchNorm`` on GPUs (on CPU use a batch-independent norm, e.g. instance or
group norm, since SyncBatchNorm needs CUDA); only rank 0 writes checkpoints and logs.

``python -m medsegkit.train.distributed selfcheck`` (under torchrun) proves the equivalence: N ranks on
1/N of a global batch reproduce one process on the whole batch.

Ending a worker: after :func:`cleanup_distributed`, a torchrun worker ends through :func:`end_worker_process`,
not through Python's interpreter shutdown. torch cannot stop gloo's native worker threads
(``pt_gloo_runloop``, ``gloo_tcp_loop``): ``ProcessGroupGloo`` has no ``shutdown``, its threads are joined only
when the group object is freed, and ``DistributedDataParallel`` keeps references to the default group, so it
never is. Those threads outlive ``destroy_process_group()``; when one of them still has to take the GIL (to
release the last reference to a tensor from the last collective, delayed on a busy machine) after
``Py_FinalizeEx`` began, CPython ends it with ``pthread_exit``, whose unwinding crosses a ``noexcept`` C++
frame: ``std::terminate`` -- "terminate called without an active exception", SIGABRT, and torchrun kills
the other ranks. :func:`end_worker_process` runs the ``atexit`` handlers, flushes logs and standard
streams, and leaves with ``os._exit`` so no finalisation runs beside those threads.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medsegkit._ranks import shard  # re-exported: the torch-free rank helpers live below inference and train

__all__ = [
    "DistributedContext",
    "barrier",
    "cleanup_distributed",
    "end_worker_process",
    "is_main_process",
    "setup_distributed",
    "shard",
    "wrap_model",
]

# set once setup_distributed() started, or cleanup_distributed() destroyed, this process's group: its native
# communication threads then run until the process ends (see end_worker_process)
_group_threads_started = False


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands: ``rank`` of ``world_size`` processes, on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(backend: str | None = None, device: str | None = None) -> DistributedContext:
    """Initialise the process group when launched by torchrun; a single-process context otherwise.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default nccl when CUDA is available, gloo otherwise.
        device: force a device (``"cpu"``); default ``cuda:LOCAL_RANK`` when CUDA is available.
    """
    global _group_threads_started
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    dev = torch.device(device) if device else torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if world_size > 1 and not dist.is_initialized():
        chosen = backend or ("nccl" if dev.type == "cuda" else "gloo")
        if chosen == "nccl" and dev.type != "cuda":
            raise ValueError("the nccl backend needs CUDA devices; use backend='gloo' on CPU")
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=chosen, rank=rank, world_size=world_size)
        _group_threads_started = True
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def cleanup_distributed(barrier: bool = True) -> None:
    """Destroy the process group (if any). ``barrier``: first wait until every rank gets here, so no rank
    shuts its group down while a peer still has traffic in flight; pass ``False`` on an error path, where
    the other ranks may never arrive (torchrun then stops them)."""
    global _group_threads_started
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        _group_threads_started = True
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def end_worker_process(exit_code: int = 0) -> None:
    """End this torchrun worker now if these helpers started or destroyed its process group (whose native
    threads then live until the process ends); return, doing nothing, otherwise (a plain process, or a group
    someone else owns and has not handed to :func:`cleanup_distributed`).

    Call it last, after :func:`cleanup_distributed`, where the entry point would return ``exit_code``.
    It runs the ``atexit`` handlers (temporary files, child processes...), shuts logging down, flushes
    ``sys.stdout`` / ``sys.stderr`` and calls ``os._exit(exit_code)``: the process ends without interpreter
    finalisation, the phase in which a gloo thread that needs the GIL is killed by ``pthread_exit`` and
    aborts the process (see the module docstring).
    """
    if not _group_threads_started:
        return
    cleanup_distributed(barrier=exit_code == 0)
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    os._exit(exit_code)


def is_main_process() -> bool:
    """True on rank 0 (and in a plain single process)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap_model(model: nn.Module, context: DistributedContext) -> nn.Module:
    """Move ``model`` to the context's device; in a distributed run convert BatchNorm to SyncBatchNorm
    (GPU only) and wrap it in ``DistributedDataParallel``."""
    model = model.to(context.device)
    if not context.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if context.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return DistributedDataParallel(model, device_ids=[context.device])
    return DistributedDataParallel(model)


# --------------------------------------------------------------------------------------------------
# self-check: N ranks on 1/N of a global batch == one process on the whole batch


def _selfcheck_model() -> nn.Module:
    from medsegkit.registry import create_model

    # instance norm is batch-independent, so per-rank halves see the same statistics as the whole batch
    return create_model("UNet3d", in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2),
                        norm="instance")


def _selfcheck_batch(global_batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1234)
    images = torch.randn(global_batch, 1, 16, 16, 16, generator=generator)
    labels = torch.randint(0, 3, (global_batch, 1, 16, 16, 16), generator=generator)
    return images, labels


def _train_steps(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, reduce_loss, *,
                 micro_batch: int, distributed: bool) -> list[float]:
    """``steps`` optimiser steps on one fixed batch through the training engine's own iteration: a MONAI
    ``SupervisedTrainer`` running :class:`~medsegkit.train.step.TrainStep` (micro-batches, DDP gradient
    synchronisation on the last one) with the semantic objective."""
    from ignite.engine import Events
    from monai.engines import SupervisedTrainer

    from medsegkit.train.objectives import SemanticObjective
    from medsegkit.train.step import TrainStep

    objective = SemanticObjective()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    step = TrainStep(model, objective, micro_batch=micro_batch, amp_dtype=None, distributed=distributed,
                     in_channels=None)
    trainer = SupervisedTrainer(device=torch.device("cpu"), max_epochs=1, epoch_length=steps, network=model,
                                train_data_loader=[{"image": images, "label": labels}] * steps, optimizer=optimizer,
                                loss_function=objective, iteration_update=step, amp=False, decollate=False)
    losses: list[float] = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda engine: losses.append(reduce_loss(torch.tensor(engine.state.output["loss"]))))
    trainer.run()
    return losses


def selfcheck(steps: int = 5, global_batch: int = 4, out_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Run under torchrun: returns (on rank 0) the per-step losses of the distributed run and of a
    single-process run on the whole batch, their max difference, and whether ranks agree on weights."""
    import torch.distributed as dist

    from medsegkit.weights import save_checkpoint

    context = setup_distributed(device="cpu")
    world = context.world_size
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} must divide by the world size {world}")
    torch.manual_seed(0)
    reference = _selfcheck_model()
    replica = _selfcheck_model()
    replica.load_state_dict(reference.state_dict())
    ddp_model = wrap_model(replica, context)  # DDP also broadcasts rank 0's weights at construction
    images, labels = _selfcheck_batch(global_batch)
    per_rank = global_batch // world
    mine = slice(context.rank * per_rank, (context.rank + 1) * per_rank)

    def all_reduce_mean(loss: torch.Tensor) -> float:
        if context.is_distributed:
            loss = loss.clone()
            dist.all_reduce(loss)
            loss /= world
        return float(loss)

    ddp_model.train()
    # each rank in micro-batches of one (gradients synchronised on the last), against one process on the
    # whole batch at once: the engine's accumulation and DDP averaging together equal one big batch
    distributed_losses = _train_steps(ddp_model, images[mine], labels[mine], steps, all_reduce_mean, micro_batch=1,
                                      distributed=context.is_distributed)
    result: dict[str, Any] = {"world_size": world, "rank": context.rank, "distributed_losses": distributed_losses}

    # gradients agree <=> every rank holds the same weights after the steps
    flat = torch.cat([p.detach().flatten() for p in ddp_model.parameters()])
    if context.is_distributed:
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        result["max_weight_difference_across_ranks"] = max(float((g - flat).abs().max()) for g in gathered)
    else:
        result["max_weight_difference_across_ranks"] = 0.0

    if context.is_main:
        reference.train()
        single_losses = _train_steps(reference, images, labels, steps, float, micro_batch=global_batch,
                                     distributed=False)
        result["single_process_losses"] = single_losses
        result["max_loss_difference"] = max(abs(a - b) for a, b in zip(distributed_losses, single_losses))
        if out_dir is not None:
            out = Path(out_dir)
            save_checkpoint(replica, out / "selfcheck.safetensors", metadata={"selfcheck": result},
                            overwrite=True)  # the selfcheck's own files, rewritten by each run like its JSON
            (out / "selfcheck.json").write_text(json.dumps(result, indent=2))
    else:
        result["single_process_losses"] = None
    if out_dir is not None:
        (Path(out_dir) / f"rank{context.rank}.done").write_text("ok")
    barrier()
    cleanup_distributed()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medsegkit.train.distributed")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("selfcheck", help="DDP on halves == one process on the whole batch")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--global-batch", type=int, default=4)
    p.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = selfcheck(args.steps, args.global_batch, args.out)
    if result["rank"] == 0:
        print(json.dumps(result))
    end_worker_process(0)  # under torchrun: ends here, without interpreter finalisation
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
