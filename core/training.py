"""The training loop: plain accelerate, one ``prepare``, the extractor's own step."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm.auto import tqdm

from gem.interfaces import Extractor
from gem.recipe import TrainingOptions
from gem.relations import RelationModel


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN or infinite."""


class UInt8Images(Dataset):
    """Serves rows of a uint8 (N, H, W, 3) array (often a memmap) as uint8 tensors."""

    def __init__(self, images: np.ndarray, indices: Optional[np.ndarray] = None):
        self.images = images
        self.indices = np.arange(len(images)) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.array(self.images[self.indices[i]]))


def to_float(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [0, 1]."""
    return batch.permute(0, 3, 1, 2).float().div_(255.0)


class Trainer:
    """Trains an extractor and the relation path on images, resumable step by step."""

    def __init__(self, extractor: Extractor, relation: RelationModel, images: np.ndarray,
                 train_indices: np.ndarray, options: TrainingOptions, seed: int, accelerator: Any,
                 checkpoint_dir: Optional[Path] = None, sample_weights: Optional[np.ndarray] = None):
        if len(train_indices) < options.batch_size:
            raise ValueError(f"training.batch_size is {options.batch_size} but only {len(train_indices)} "
                             "training images are left; lower the batch size or add images")
        self.options = options
        self.accelerator = accelerator
        self.checkpoint_dir = checkpoint_dir
        optimizers = extractor.configure_optimizers()
        self.graph_optimizer = (torch.optim.Adam(relation.parameters(), lr=options.graph_lr)
                                if relation.graph.trainable else None)
        generator = torch.Generator().manual_seed(seed)
        sampler = None
        if sample_weights is not None:
            # Correlated sampling: draw with replacement in proportion to the weights.
            sampler = WeightedRandomSampler(torch.as_tensor(sample_weights[train_indices], dtype=torch.double),
                                            num_samples=len(train_indices), replacement=True, generator=generator)
        loader = DataLoader(UInt8Images(images, train_indices), batch_size=options.batch_size,
                            shuffle=sampler is None, sampler=sampler, drop_last=True,
                            num_workers=options.num_workers, generator=generator)
        extra = [self.graph_optimizer] if self.graph_optimizer is not None else []
        prepared = accelerator.prepare(extractor, relation, loader, *optimizers.values(), *extra)
        self.extractor, self.relation, self.loader = prepared[:3]
        self.optimizers = dict(zip(optimizers, prepared[3:3 + len(optimizers)]))
        if extra:
            self.graph_optimizer = prepared[-1]
        self.step = 0
        self.history: list[dict[str, float]] = []
        self._batches = self._forever()

    def _forever(self) -> Iterator[torch.Tensor]:
        while True:
            yield from self.loader

    @property
    def model(self) -> Extractor:
        return self.accelerator.unwrap_model(self.extractor)

    @property
    def relate(self) -> RelationModel:
        return self.accelerator.unwrap_model(self.relation)

    def fit(self, until: int, desc: str = "train") -> None:
        """Train until the global step ``until`` (exclusive)."""
        acc, opts = self.accelerator, self.options
        train_graph = self.graph_optimizer is not None and self.relate.is_bound
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(total=max(until - self.step, 0), desc=desc, unit="step", dynamic_ncols=True,
                   disable=not acc.is_local_main_process)
        self.extractor.train()
        self.relation.train()
        while self.step < until:
            x = to_float(next(self._batches))
            with acc.autocast():
                logs = self.model.training_step(x, self.relation, acc, self.optimizers)
                if train_graph:
                    penalty = self.relate.graph.penalty()
                    acc.backward(penalty)
                    logs["graph_penalty"] = penalty.item()
            if train_graph:
                self.graph_optimizer.step()
                self.graph_optimizer.zero_grad(set_to_none=True)
                self.relate.graph.end_step(self.step)
            for key, value in logs.items():
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"loss term {key!r} became {value} at step {self.step}; "
                                             "lower the learning rate or check the data")
                sums[key] = sums.get(key, 0.0) + value
            count += 1
            self.step += 1
            bar.update(1)
            if count == opts.log_every or self.step == until:
                record = {"step": self.step, **{k: v / count for k, v in sums.items()}}
                self.history.append(record)
                bar.set_postfix({k: f"{v:.3g}" for k, v in record.items() if k in ("loss", "recon", "kl")})
                sums, count = {}, 0
            if opts.checkpoint_every and self.checkpoint_dir and self.step % opts.checkpoint_every == 0:
                self.save(self.checkpoint_dir)
        bar.close()

    def save(self, directory: Path) -> None:
        """Save models, optimisers and RNG states through accelerate."""
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(directory))


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
