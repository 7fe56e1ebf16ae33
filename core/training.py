"""The training loop: plain accelerate, one ``prepare``, the extractor's own step.

A run can stop at any step and continue bit for bit: the batch order is a pure function of the
seed and the step (:class:`EpochSampler`), and a checkpoint (:meth:`Trainer.save`) holds the
models, optimisers, graph, binding, RNG states, step and the partial loss log. Checkpoints are
one file, ``checkpoint/state.pt``, written atomically (temporary file, then rename), so the last
good one survives a crash mid-write; they are read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from gem.errors import GemError
from gem.interfaces import Extractor
from gem.io import atomic_write_bytes
from gem.recipe import RecipeError, TrainingOptions
from gem.relations import RelationModel
from gem.progress import progress

#: The checkpoint file inside a checkpoint folder.
CHECKPOINT_FILE = "state.pt"
#: Bumped when the checkpoint layout changes.
CHECKPOINT_VERSION = 1


class NonFiniteLossError(GemError, ValueError):
    """A loss term became NaN or infinite (a :class:`gem.errors.GemError`: the CLI shows it as one line)."""


class CheckpointError(GemError, ValueError):
    """A checkpoint is missing, unreadable or from another run."""


class Interrupted(KeyboardInterrupt):
    """The run was stopped by Ctrl-C (SIGINT) after saving what it had; the message says how to resume."""


class UInt8Images(Dataset):
    """Serves rows of a uint8 (N, H, W, 3) array (often a memmap) as uint8 tensors.

    With ``auxiliary`` (N, K) each item is the pair (image, float32 auxiliary row).
    """

    def __init__(self, images: np.ndarray, indices: Optional[np.ndarray] = None,
                 auxiliary: Optional[np.ndarray] = None):
        self.images = images
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)
        self.auxiliary = None if auxiliary is None else torch.as_tensor(np.asarray(auxiliary, dtype=np.float32))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        image = torch.from_numpy(np.array(self.images[self.indices[i]]))
        if self.auxiliary is None:
            return image
        return image, self.auxiliary[self.indices[i]]


class EpochSampler(Sampler[int]):
    """Training order as a pure function of (seed, epoch), so a resumed run draws the same batches.

    Epoch e is a permutation of the n positions (or, with ``weights``, n draws with replacement in
    proportion to them) from a generator seeded with ``(seed, e)``. :meth:`seek` positions the
    sampler at a global step; the next pass starts there.
    """

    def __init__(self, n: int, seed: int, weights: Optional[torch.Tensor] = None):
        self.n, self.seed, self.weights = n, seed, weights
        self.epoch, self.skip = 0, 0

    def order(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (2 ** 63))
        if self.weights is None:
            return torch.randperm(self.n, generator=generator)
        return torch.multinomial(self.weights, self.n, replacement=True, generator=generator)

    def seek(self, step: int, batch_size: int, processes: int = 1) -> None:
        """Start the next pass at global ``step`` (batches of ``batch_size`` per process, last one dropped)."""
        per_epoch = max((self.n // batch_size) // processes, 1)
        self.epoch, within = divmod(step, per_epoch)
        self.skip = within * batch_size * processes

    def __iter__(self) -> Iterator[int]:
        epoch, skip = self.epoch, self.skip
        self.epoch, self.skip = epoch + 1, 0
        yield from self.order(epoch)[skip:].tolist()

    def __len__(self) -> int:
        return self.n - self.skip


class GradientAveraging:
    """Wraps an (accelerate) optimiser so that ``step`` first averages its gradients over processes.

    Extractors own their steps and may run several backward passes per batch (a discriminator, a
    critic, the graph penalty), which DistributedDataParallel's one-forward-one-backward hooks do
    not cover. Averaging each optimiser's gradients right before its step keeps every replica
    identical for any such step. The gradients go in one flat all-reduce per optimiser.
    """

    def __init__(self, optimizer: Any, accelerator: Any):
        self.optimizer, self.accelerator = optimizer, accelerator

    def _average(self) -> None:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def step(self, *args: Any, **kwargs: Any) -> Any:
        if self.accelerator.sync_gradients:
            self._average()
        return self.optimizer.step(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.optimizer, name)


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states, as values ``torch.load(weights_only=True)`` reads."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_checkpoint(directory: Path) -> Optional[dict[str, Any]]:
    """The checkpoint in ``directory`` (``weights_only=True``), or None when there is none."""
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, keep the file
        raise CheckpointError(f"cannot read the checkpoint {path}: {exc}") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} is not a gem checkpoint of version {CHECKPOINT_VERSION}")
    return state


class _PreparedRelation:
    """A relation module prepared by accelerate, as extractors see it: called through the wrapper
    (so several processes stay in step) with the module's own ``is_bound``, which
    DistributedDataParallel does not pass through."""

    def __init__(self, prepared: Any, module: RelationModel):
        self.prepared, self.module = prepared, module

    @property
    def is_bound(self) -> bool:
        return self.module.is_bound

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.prepared(z)


def run_step(extractor: Any, relation: Any, optimizers: dict[str, torch.optim.Optimizer],
             graph_optimizer: Optional[torch.optim.Optimizer], accelerator: Any, x: torch.Tensor, step: int,
             **extra: Any) -> dict[str, float]:
    """One training step as :meth:`Trainer.fit` runs it: the extractor's own step, then (with a
    ``graph_optimizer``) the graph penalty and the graph learner's step. Returns the loss terms.

    The step runs on the unwrapped modules, because extractors own several backward passes;
    ``GradientAveraging`` keeps replicas in sync, and ``accumulate()`` skips updates between steps.
    """
    module = accelerator.unwrap_model(relation)
    graph = module.graph
    seen = relation if relation is module else _PreparedRelation(relation, module)
    with accelerator.accumulate(extractor, relation), accelerator.autocast():
        logs = accelerator.unwrap_model(extractor).training_step(x, seen, accelerator, optimizers, **extra)
        if graph_optimizer is not None:
            penalty = graph.penalty()
            accelerator.backward(penalty)
            logs["graph_penalty"] = penalty.item()
            graph_optimizer.step()
            graph_optimizer.zero_grad(set_to_none=True)
            if accelerator.sync_gradients:
                graph.end_step(step)
    return logs


class Trainer:
    """Trains an extractor and the relation path on images, resumable step by step."""

    def __init__(self, extractor: Extractor, relation: RelationModel, images: np.ndarray,
                 train_indices: np.ndarray, options: TrainingOptions, seed: int, accelerator: Any,
                 checkpoint_dir: Optional[Path] = None, sample_weights: Optional[np.ndarray] = None,
                 auxiliary: Optional[np.ndarray] = None):
        if len(train_indices) < options.batch_size:
            raise RecipeError(f"training.batch_size is {options.batch_size} but only {len(train_indices)} "
                              "training images are left; lower the batch size or add images")
        if options.batch_size % accelerator.num_processes:
            raise RecipeError(f"training.batch_size is {options.batch_size}, which {accelerator.num_processes} "
                              "processes cannot share evenly; use a multiple of the number of processes")
        self.options = options
        self.accelerator = accelerator
        self.checkpoint_dir = checkpoint_dir
        optimizers = extractor.configure_optimizers()
        self.graph_optimizer = (torch.optim.Adam(relation.parameters(), lr=options.graph_lr)
                                if relation.graph.trainable else None)
        weights = (torch.as_tensor(np.asarray(sample_weights)[train_indices], dtype=torch.double)
                   if sample_weights is not None else None)
        self.sampler = EpochSampler(len(train_indices), seed, weights)
        # The loader's own generator (worker seeds) keeps it off the global RNG.
        loader = DataLoader(UInt8Images(images, train_indices, auxiliary), batch_size=options.batch_size,
                            sampler=self.sampler, drop_last=True, num_workers=options.num_workers,
                            generator=torch.Generator().manual_seed(seed))
        extra = [self.graph_optimizer] if self.graph_optimizer is not None else []
        if any(p.requires_grad for p in relation.parameters()):
            relation = accelerator.prepare(relation)
        else:  # DistributedDataParallel refuses a module with nothing to train (identity, fixed graphs)
            relation = relation.to(accelerator.device)
        prepared = accelerator.prepare(extractor, loader, *optimizers.values(), *extra)
        self.prepared_extractor, self.loader = prepared[:2]
        self.prepared_relation = relation
        self.optimizers = dict(zip(optimizers, prepared[2:2 + len(optimizers)]))
        if extra:
            self.graph_optimizer = prepared[-1]
        if accelerator.num_processes > 1:
            self.optimizers = {k: GradientAveraging(v, accelerator) for k, v in self.optimizers.items()}
            if self.graph_optimizer is not None:
                self.graph_optimizer = GradientAveraging(self.graph_optimizer, accelerator)
        self.step = 0
        self.history: list[dict[str, float]] = []
        #: Saved with every checkpoint (the pipeline puts the scores here).
        self.extra: dict[str, Any] = {}
        #: Called with each record appended to :attr:`history` (live tracking).
        self.on_log: Optional[Callable[[dict[str, float]], None]] = None
        self.last_checkpoint_step: Optional[int] = None
        self._sums: dict[str, float] = {}
        self._count = 0
        self._stop = False
        self._batches = self._forever()

    def _forever(self) -> Iterator[torch.Tensor]:
        while True:
            yield from self.loader

    @property
    def extractor(self) -> Extractor:
        """The extractor being trained (without accelerate's wrapper)."""
        return self.accelerator.unwrap_model(self.prepared_extractor)

    @property
    def relation(self) -> RelationModel:
        """The relation module being trained (without accelerate's wrapper)."""
        return self.accelerator.unwrap_model(self.prepared_relation)

    def fit(self, until: int, desc: str = "train") -> None:
        """Train until the global step ``until`` (exclusive).

        Ctrl-C (SIGINT) finishes the current step, saves a checkpoint and raises
        :class:`Interrupted`; a second Ctrl-C stops at once. A NaN or infinite loss term raises
        :class:`NonFiniteLossError` without saving, so the last good checkpoint stays.
        """
        acc, opts = self.accelerator, self.options
        train_graph = self.graph_optimizer is not None and self.relation.is_bound
        bar = progress(max(until - self.step, 0), desc, unit="step", disable=not acc.is_local_main_process,
                       dynamic_ncols=True)
        self.prepared_extractor.train()
        self.prepared_relation.train()
        previous = self._catch_sigint()
        try:
            while self.step < until:
                batch = next(self._batches)
                extra = {}
                if isinstance(batch, (tuple, list)):  # (images, auxiliary variable u)
                    batch, extra = batch[0], {"u": batch[1].float()}
                x = to_float(batch)
                logs = run_step(self.prepared_extractor, self.prepared_relation, self.optimizers,
                                self.graph_optimizer if train_graph else None, acc, x, self.step, **extra)
                for key, value in logs.items():
                    if not math.isfinite(value):
                        raise NonFiniteLossError(f"loss term {key!r} became {value} at step {self.step}; "
                                                 f"{self._kept()}; lower the learning rate or check the data")
                    self._sums[key] = self._sums.get(key, 0.0) + value
                self._count += 1
                self.step += 1
                bar.update(1)
                if self._count == opts.log_every or self.step == until:
                    record = {"step": self.step, **self._mean_over_processes(
                        {k: v / self._count for k, v in self._sums.items()})}
                    self.history.append(record)
                    if self.on_log is not None:
                        self.on_log(record)
                    bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "recon", "kl")})
                    self._sums, self._count = {}, 0
                if opts.checkpoint_every and self.checkpoint_dir and self.step % opts.checkpoint_every == 0:
                    self.save(self.checkpoint_dir)
                if self.stop_requested():
                    self.interrupt()
        finally:
            bar.close()
            self._restore_sigint(previous)

    def _mean_over_processes(self, logs: dict[str, float]) -> dict[str, float]:
        """Loss terms averaged over every process's share of the batches."""
        if self.accelerator.num_processes == 1 or not logs:
            return logs
        keys = sorted(logs)
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist()))

    # -- interruption ---------------------------------------------------------------------------
    def stop_requested(self) -> bool:
        """Whether Ctrl-C asked the loop to stop after the current step."""
        return self._stop

    def interrupt(self) -> None:
        """Save a checkpoint (when there is a folder for it) and raise :class:`Interrupted`."""
        if self.checkpoint_dir is None:
            raise Interrupted(f"stopped at step {self.step}; no checkpoint folder, nothing was saved")
        self.save(self.checkpoint_dir)
        raise Interrupted(f"stopped at step {self.step}; checkpoint saved in {self.checkpoint_dir}; "
                          f"continue with: gem-run --resume {self.checkpoint_dir.parent}")

    @contextlib.contextmanager
    def ctrl_c_stops_cleanly(self) -> Iterator[None]:
        """Within the block, a first Ctrl-C only asks to stop (:meth:`stop_requested`), also between
        :meth:`fit` calls (binding, saving), so the caller can :meth:`interrupt` at a safe point."""
        previous = self._catch_sigint()
        try:
            yield
        finally:
            self._restore_sigint(previous)

    def _catch_sigint(self) -> Any:
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum: int, frame: Any) -> None:
            if self._stop:  # a second Ctrl-C: stop at once
                raise KeyboardInterrupt
            self._stop = True
            print("\ngem: Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)

        return signal.signal(signal.SIGINT, handler)

    @staticmethod
    def _restore_sigint(previous: Any) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    def _kept(self) -> str:
        if self.last_checkpoint_step is None or self.checkpoint_dir is None:
            return "no checkpoint was written before it (training.checkpoint_every sets how often)"
        return f"the last good checkpoint (step {self.last_checkpoint_step}) is kept in {self.checkpoint_dir}"

    # -- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs, as values ``torch.load(weights_only=True)`` reads."""
        scaler = getattr(self.accelerator, "scaler", None)
        return {
            "version": CHECKPOINT_VERSION,
            "step": self.step,
            "extractor": self.extractor.state_dict(),
            "relation": self.relation.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "graph_optimizer": self.graph_optimizer.state_dict() if self.graph_optimizer is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng_state(),
            "history": self.history,
            "log_sums": dict(self._sums),
            "log_count": self._count,
            "extra": self.extra,
        }

    def save(self, directory: Path) -> None:
        """Write ``directory/state.pt`` atomically (temporary file, then rename); the previous
        checkpoint stays in place until the new one is complete. Only the main process writes."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            buffer = io.BytesIO()
            torch.save(self.state_dict(), buffer)
            atomic_write_bytes(Path(directory) / CHECKPOINT_FILE, buffer.getvalue())
        self.last_checkpoint_step = self.step
        self.accelerator.wait_for_everyone()

    def load(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint made by :meth:`save` (see :func:`load_checkpoint`)."""
        try:
            self.extractor.load_state_dict(state["extractor"])
            self.relation.load_state_dict(state["relation"])
            for name, opt in self.optimizers.items():
                if name not in state["optimizers"]:
                    raise CheckpointError(f"the checkpoint has no state for the optimiser {name!r}")
                opt.load_state_dict(state["optimizers"][name])
            if self.graph_optimizer is not None and state["graph_optimizer"] is not None:
                self.graph_optimizer.load_state_dict(state["graph_optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = " ".join(str(exc).strip().splitlines()[:2])
            raise CheckpointError(f"the checkpoint in {self.checkpoint_dir} does not fit the model this recipe "
                                  f"builds (was the plugin changed since?): {first}") from None
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state["scaler"] is not None:
            scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self._sums, self._count = dict(state["log_sums"]), int(state["log_count"])
        self.extra = dict(state["extra"])
        self.last_checkpoint_step = self.step
        self.sampler.seek(self.step, self.options.batch_size)  # split batches: one global order
        self._batches = self._forever()
        set_rng_state(state["rng"])


@torch.no_grad()
def encode_images(extractor: Extractor, images: np.ndarray, indices: np.ndarray, device: torch.device,
                  batch_size: int = 256) -> np.ndarray:
    """Posterior means (len(indices), d) of the given images, in batches."""
    extractor.eval()
    out = []
    for start in range(0, len(indices), batch_size):
        batch = torch.from_numpy(np.asarray(images[np.sort(indices[start:start + batch_size])]))
        order = np.argsort(np.argsort(indices[start:start + batch_size]))
        mu, _ = extractor.encode(to_float(batch).to(device))
        out.append(mu.float().cpu().numpy()[order])
    extractor.train()
    return np.concatenate(out) if out else np.zeros((0, extractor.latent_dim))
