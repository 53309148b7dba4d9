"""Augmentation never changes what a label means, for every dataset the lessons train on.

The lessons augment with random crops (zero padding 4), horizontal flips and cutout, and lesson 06 averages
each test image with its mirror image (flip TTA). A horizontal flip turns a grating at angle theta into one
at 180 - theta, so a synthetic set whose classes were orientations had its labels changed by flips.
"""

import functools
import math

import pytest
import torch
from conftest import load_lesson

import helpers


def mirror_parameters(params: dict) -> dict:
    """The grating parameters of the left-right mirror image: x -> -x."""
    mirrored = dict(params)
    mirrored["theta"] = math.pi - params["theta"]
    mirrored["blob_centre"] = params["blob_centre"] * torch.tensor([-1.0, 1.0])
    return mirrored


def folded_tilt(theta: torch.Tensor) -> torch.Tensor:
    """A grating's tilt from the vertical, the same for the grating and its mirror image."""
    folded = torch.remainder(theta, math.pi)
    return torch.minimum(folded, math.pi - folded)


def test_synthetic_mirror_image_is_a_grating_of_the_same_class():
    params = helpers.synthetic_parameters(2000, torch.Generator().manual_seed(0))
    images = helpers.render_gratings(params)
    mirrored = mirror_parameters(params)
    assert torch.allclose(images.flip(3), helpers.render_gratings(mirrored), atol=1e-5)
    assert torch.allclose(folded_tilt(params["theta"]), folded_tilt(mirrored["theta"]), atol=1e-6)
    assert sorted(params["label"].unique().tolist()) == list(range(len(helpers.SYNTHETIC_CLASSES)))


def test_synthetic_labels_are_the_drawn_classes():
    """Jitter never pushes a grating into a neighbouring class, for either sign of the tilt, and the frequency
    stays inside the label's band."""
    params = helpers.synthetic_parameters(5000, torch.Generator().manual_seed(1))
    labels, gap = params["label"], (math.pi / 2) / (helpers.SYNTHETIC_TILTS - 1)
    assert ((folded_tilt(params["theta"]) / gap - (labels % helpers.SYNTHETIC_TILTS)).abs() <= 1 / 3 + 1e-6).all()
    for band, (low, high) in enumerate(helpers.SYNTHETIC_BANDS):
        freq = params["freq"][labels // helpers.SYNTHETIC_TILTS == band]
        assert len(freq) > 0 and (freq >= low).all() and (freq <= high).all()
    assert (params["theta"] > math.pi / 2).float().mean() == pytest.approx(0.5, abs=0.05)  # both mirror images


# --------------------------------------------------------------------------------------------------
# A dataset-agnostic check: an oracle that reads a label from the image (nearest class centroid of the
# image's Fourier magnitude, which ignores phase and position) must read it as well when its class centroids
# are built from augmented images as from plain ones. An augmentation that moves images from one class to
# another blurs the classes into each other and the oracle loses accuracy: the old orientation-class synthetic
# set dropped from 91% to 49% under random crop + flip; the current one drops 4 points, Fashion-MNIST 2.
# --------------------------------------------------------------------------------------------------
def fourier_features(images: torch.Tensor) -> torch.Tensor:
    grey = images.float().mean(1)  # (B, C, H, W) -> (B, H, W)
    grey = grey - grey.mean((1, 2), keepdim=True)
    magnitude = torch.fft.fft2(grey, s=(64, 64)).abs().flatten(1)  # (B, 64 * 64)
    return magnitude / magnitude.norm(dim=1, keepdim=True).clamp_min(1e-8)


def oracle_accuracy(train_x, train_y, test_x, test_y, num_classes: int) -> float:
    features = fourier_features(train_x)
    centroids = torch.stack([features[train_y == c].mean(0) for c in range(num_classes)])
    return (torch.cdist(fourier_features(test_x), centroids).argmin(1) == test_y).float().mean().item()


@functools.cache
def lesson_augmentations():
    lesson06 = load_lesson(6)
    return {
        "crop and flip (lessons 03-06)": lambda x, g: helpers.random_crop_flip(x, generator=g),
        "crop, flip and cutout 8 (lesson 06)": lambda x, g: lesson06.augment(x, 8, g),
        "mirror every image (flip TTA)": lambda x, g: x.flip(3),
    }


@functools.cache
def labelled_sets():
    sets = {"synthetic": helpers.make_synthetic(4000, seed=1)}
    try:
        data = helpers.load_dataset("fashion-mnist", "data", val_size=100, train_size=4000, download=False)
        sets["fashion-mnist"] = (data.train_x, data.train_y)
    except helpers.DataUnavailableError:
        pass  # not on this machine: the synthetic set is still checked
    return sets  # CIFAR-10/100's classes (animals, vehicles) are mirror-symmetric by meaning; no files here


@pytest.mark.parametrize("dataset", ["synthetic", "fashion-mnist"])
@pytest.mark.parametrize("augmentation", list(lesson_augmentations()))
def test_augmentation_keeps_every_label_meaning(dataset, augmentation):
    sets = labelled_sets()
    if dataset not in sets:
        pytest.skip(f"{dataset} is not on this machine")
    images, labels = sets[dataset]
    half = len(images) // 2
    train_x, train_y, test_x, test_y = images[:half], labels[:half], images[half:], labels[half:]
    augmented = lesson_augmentations()[augmentation](train_x, torch.Generator().manual_seed(0))
    assert augmented.shape == train_x.shape and augmented.dtype == train_x.dtype
    plain = oracle_accuracy(train_x, train_y, test_x, test_y, 10)
    if augmentation.startswith("mirror"):  # the TTA view: the classes as flip TTA sees them, both views
        augmented, train_y = torch.cat([train_x, augmented]), torch.cat([train_y, train_y])
    after = oracle_accuracy(augmented, train_y, test_x, test_y, 10)
    assert plain > 0.5  # the oracle reads the labels at all
    assert after > plain - 0.08, f"{augmentation} blurs {dataset}'s classes: oracle {plain:.1%} -> {after:.1%}"
