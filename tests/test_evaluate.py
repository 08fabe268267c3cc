"""The classification metrics against scikit-learn's, to the last bit."""


import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support

from fmnist_crnn import data
from fmnist_crnn.evaluate import classification_metrics, confusion

CLASSES = list(range(len(data.CLASS_NAMES)))


def logits_for(predicted: np.ndarray) -> torch.Tensor:
    logits = torch.zeros(len(predicted), len(CLASSES))
    logits[torch.arange(len(predicted)), torch.from_numpy(predicted)] = 1.0
    return logits


@pytest.mark.parametrize("case", ["uniform", "skewed", "classes missing", "one image"])
def test_metrics_equal_sklearn_to_the_last_bit(case):
    rng = np.random.default_rng(len(case))
    n = {"one image": 1}.get(case, 997)
    actual = rng.integers(0, 10, n)
    predicted = np.where(rng.random(n) < 0.8, actual, rng.integers(0, 10, n))
    if case == "skewed":
        predicted = np.where(rng.random(n) < 0.5, 3, predicted)
    if case == "classes missing":  # 7 never actual, 8 never predicted, 9 neither
        actual, predicted = np.where(actual >= 7, 0, actual), np.where(predicted >= 8, 1,
                                                                       predicted)
    labels = torch.from_numpy(actual).long()
    metrics = classification_metrics(logits_for(predicted), labels)

    precision, recall, f1, support = precision_recall_fscore_support(
        actual, predicted, labels=CLASSES, zero_division=0)
    expected = {name: {"precision": float(p), "recall": float(r), "f1": float(f),
                       "support": int(s)}
                for name, p, r, f, s in zip(data.CLASS_NAMES, precision, recall, f1, support,
                                            strict=True)}
    assert metrics["per_class"] == expected
    assert metrics["macro_f1"] == float(f1_score(actual, predicted, labels=CLASSES,
                                                 average="macro", zero_division=0))
    assert np.array_equal(confusion(logits_for(predicted), labels),
                          confusion_matrix(actual, predicted, labels=CLASSES))
