"""The nearest-class-mean intensity classifier: the bar a trained tissue model has to clear."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medsegkit.train.data import LabelledVolume

__all__ = ["class_means", "nearest_class_mean_baseline", "predict_nearest_mean"]


def class_means(volumes: Sequence[LabelledVolume], num_classes: int) -> np.ndarray:
    """Mean first-channel intensity of each class over ``volumes`` → ``(K,)``."""
    sums = np.zeros(num_classes)
    counts = np.zeros(num_classes)
    for volume in volumes:
        image = volume.image[0][..., volume.score_from :].astype(np.float64)
        label = volume.label[..., volume.score_from :]
        sums += np.bincount(label.ravel(), weights=image.ravel(), minlength=num_classes)[:num_classes]
        counts += np.bincount(label.ravel(), minlength=num_classes)[:num_classes]
    if np.any(counts == 0):
        missing = [k for k in range(num_classes) if counts[k] == 0]
        raise ValueError(f"classes {missing} never occur in the training data; cannot compute their mean intensity")
    return sums / counts


def predict_nearest_mean(image: np.ndarray, means: np.ndarray) -> np.ndarray:
    """Label each voxel of ``image`` ``(C, *spatial)`` with the class whose mean (channel 0) is closest."""
    return np.argmin(np.abs(image[0][..., None].astype(np.float64) - means), axis=-1)


def nearest_class_mean_baseline(
    train_volumes: Sequence[LabelledVolume], val_volumes: Sequence[LabelledVolume], class_names: Sequence[str]
) -> dict:
    """Fit class means on ``train_volumes``, score on ``val_volumes`` like :func:`medsegkit.train.validate`
    (intensities as read: the classifier needs no normalisation within one scanner).

    Returns:
        ``{"class_means": [...], "dice": {class_name: float}, "mean_foreground_dice": float}``.
    """
    from medsegkit.train.engine import validate

    means = class_means(train_volumes, len(class_names))
    result = validate(None, val_volumes, class_names=class_names,
                      predictor=lambda volume: predict_nearest_mean(volume.image, means))
    return {"class_means": [round(float(m), 6) for m in means], **result}
