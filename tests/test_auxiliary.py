"""Extractors that learn from an auxiliary variable u get the labels of exactly the images they train on."""

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from gem.interfaces import BuildContext, ImageDataset
from gem.recipe import TrainingOptions
from gem.relations import RelationModel
from gem.labels import auxiliary_variable
from gem.training import Trainer
from gem_plugins.baselines import VAE
from gem_plugins.graph_learners import IdentityGraph
from gem_plugins.vae_family import VAEOptions


class RecordingVAE(VAE):
    """A VAE that asks for labels and records which images came with which u."""

    auxiliary = "labels"

    def __init__(self, options, context):
        super().__init__(options, context)
        self.seen = []

    def training_step(self, x, relation, accelerator, optimizers, u=None):
        self.seen.append((x[:, 0, 0, 0].detach().clone(), u.clone()))
        return super().training_step(x, relation, accelerator, optimizers, u=u)


def _dataset(n=24):
    images = np.zeros((n, 16, 16, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(n) * 10  # the first pixel names the image
    factors = np.stack([np.arange(n), np.arange(n) % 3], axis=1)
    return ImageDataset(images=images, attributes=["a", "b"], factors=factors)


def test_trainer_passes_the_labels_of_the_served_images(tmp_path):
    dataset = _dataset()
    context = BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path, attributes=["a", "b"], dataset=dataset)
    model = RecordingVAE(VAEOptions(image_size=16, channels=4, hidden=8), context)
    relation = RelationModel(IdentityGraph(None, context), 2)
    train_idx = np.arange(4, 24)
    options = TrainingOptions(steps=6, warmup_steps=0, batch_size=4, log_every=2, cpu=True)
    trainer = Trainer(model, relation, dataset.images, train_idx, options, seed=0, accelerator=Accelerator(cpu=True),
                      auxiliary=auxiliary_variable(model, dataset, "recording"))
    trainer.fit(6)
    assert len(model.seen) == 6
    for first_pixel, u in model.seen:
        index = torch.round(first_pixel * 255 / 10).long()
        assert u.dtype == torch.float32 and u.shape == (4, 2)
        assert torch.equal(u[:, 0].long(), index)  # u is the factor row of the same image
        assert torch.equal(u[:, 1].long(), index % 3)
        assert bool((index >= 4).all())  # only training images


def test_auxiliary_variable_prefers_factors_then_scores_and_explains_when_missing(tmp_path):
    context = BuildContext(seed=0, run_dir=tmp_path, cache_dir=tmp_path, attributes=["a", "b"])
    model = RecordingVAE(VAEOptions(image_size=16, channels=4, hidden=8), context)
    dataset = _dataset(6)
    np.testing.assert_array_equal(auxiliary_variable(model, dataset), dataset.factors.astype(np.float32))
    scores = np.full((6, 2), 3)
    only_scores = ImageDataset(images=dataset.images, attributes=["a", "b"], attribute_scores=scores)
    np.testing.assert_array_equal(auxiliary_variable(model, only_scores), scores)
    unlabelled = ImageDataset(images=dataset.images, attributes=["a", "b"])
    with pytest.raises(ValueError, match="learns from labels .* neither ground-truth factors nor attribute scores"):
        auxiliary_variable(model, unlabelled, "recording")
    plain = VAE(VAEOptions(image_size=16, channels=4, hidden=8), context)
    assert auxiliary_variable(plain, unlabelled) is None


def test_auxiliary_scale_is_the_top_label_of_each_column():
    from gem.labels import auxiliary_scale

    images = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    with_levels = ImageDataset(images=images, attributes=["a", "b"], factors=np.array([[0, 2], [1, 0], [0, 1]]),
                               factor_levels=[2, 6])
    np.testing.assert_array_equal(auxiliary_scale(with_levels), [1.0, 5.0])
    no_levels = ImageDataset(images=images, attributes=["a", "b"], factors=np.array([[0, 2], [0, 0], [0, 1]]))
    np.testing.assert_array_equal(auxiliary_scale(no_levels), [1.0, 2.0])  # largest class present, at least 1
    scores = ImageDataset(images=images, attributes=["a", "b"], attribute_scores=np.full((3, 2), 3))
    np.testing.assert_array_equal(auxiliary_scale(scores), [5.0, 5.0])
    assert auxiliary_scale(ImageDataset(images=images, attributes=["a"])) is None
    assert auxiliary_scale(None) is None
