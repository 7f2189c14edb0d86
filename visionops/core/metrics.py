"""Evaluate a model on a test split: headline metrics, per-class report and plots."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionops.core.pipeline import PIXELS, predict_files


@dataclass
class Evaluation:
    metrics: dict[str, float]  # accuracy, precision_macro, recall_macro, f1_macro
    report: dict               # sklearn's per-class classification report
    confusion: np.ndarray
    predictions: np.ndarray


def score(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> Evaluation:
    from sklearn.metrics import (
        accuracy_score,
        classification_report,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    labels = list(range(len(class_names)))
    # Macro averages over the classes this split has or the model predicts: a class with
    # no test image that is never predicted must not count as a zero.
    present = sorted(set(y_true.tolist()) | {p for p in y_pred.tolist() if p >= 0})
    precision, recall, f1, _ = precision_recall_fscore_support(
        y_true, y_pred, labels=present, average="macro", zero_division=0)
    metrics = {"accuracy": float(accuracy_score(y_true, y_pred)),
               "precision_macro": float(precision), "recall_macro": float(recall),
               "f1_macro": float(f1)}
    report = classification_report(y_true, y_pred, labels=labels, target_names=class_names,
                                   output_dict=True, zero_division=0)
    return Evaluation(metrics=metrics, report=report,
                      confusion=confusion_matrix(y_true, y_pred, labels=labels),
                      predictions=y_pred)


def class_recalls(evaluation: Evaluation) -> dict[str, float]:
    """Recall of every class that has test images."""
    return {name: values["recall"] for name, values in evaluation.report.items()
            if isinstance(values, dict) and name not in ("macro avg", "weighted avg")
            and values.get("support", 0) > 0}


def evaluate_model(model, data_dir: Path, test_paths: list[str], y_test: np.ndarray,
                   class_names: list[str], model_class_names: list[str] | None = None,
                   contract: str = PIXELS) -> Evaluation:
    """Score any model on the given test files, streamed at that model's own input size
    and scaled by its input `contract`, so a champion trained at another image size, on
    other classes or before models took raw pixels is judged on the same images.
    `model_class_names` maps the model's outputs to labels (default: `class_names`); a
    label the test split does not know counts as wrong."""
    files = [Path(data_dir) / p for p in test_paths]
    outputs = np.concatenate([np.argmax(batch, axis=1) for batch in
                              predict_files(model, files, contract)] or [np.zeros(0, int)])
    index = {name: i for i, name in enumerate(class_names)}
    names = model_class_names or class_names
    y_pred = np.array([index.get(names[o], -1) for o in outputs], dtype=np.int64)
    return score(y_test, y_pred, class_names)


def plot_confusion_matrix(confusion: np.ndarray, class_names: list[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1 + 0.6 * len(class_names), 1 + 0.5 * len(class_names)))
    ax = fig.subplots()
    ax.imshow(confusion, cmap="Blues")
    ax.set(xticks=range(len(class_names)), yticks=range(len(class_names)),
           xticklabels=class_names, yticklabels=class_names,
           xlabel="predicted", ylabel="true", title="Confusion matrix (test split)")
    threshold = confusion.max() / 2 if confusion.size else 0
    for (i, j), count in np.ndenumerate(confusion):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > threshold else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_learning_curves(history: dict[str, list[float]], out_dir: Path) -> list[Path]:
    from matplotlib.figure import Figure

    paths = []
    for metric in ("loss", "accuracy"):
        if metric not in history:
            continue
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        epochs = range(1, len(history[metric]) + 1)
        ax.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        ax.set(xlabel="epoch", ylabel=metric, title=f"Learning curve: {metric}")
        ax.legend()
        fig.tight_layout()
        path = out_dir / f"learning_curve_{metric}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths

