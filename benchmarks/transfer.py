"""Transfer learning, measured: `mobilenet_v3_small` started from a weights file
pretrained on one generated photo set, against the same model from scratch, both
trained the same way on a second, small set, in one run.

    .venv/bin/python benchmarks/transfer.py [--pretrain-images 4000] [--images 400]

Set A (`--pretrain-images`, 10 classes) pretrains the backbone from random weights; its
weights are saved with `save_backbone_weights`, as a user would save weights of their
own to pass as `train.pretrained: PATH`. Set B is drawn with another seed and is small
(`--images`). On B, "scratch" trains the whole network from random weights, and
"pretrained" trains the head with the backbone frozen, then fine-tunes its top layers
(`fine_tune.unfreeze_from`), for the same number of epochs in all. Both are scored on
B's test split. Written to benchmarks/transfer.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from photos import make_photos  # noqa: E402

SIZE = 64


def prepared(root: Path):
    import pandas as pd

    from visionops.core.config import DataParams, SplitParams
    from visionops.core.images import iter_image_files
    from visionops.core.split import assign_splits, prepare_data

    # the split is keyed on a content hash; the path stands in for it (no re-hashing)
    facts = pd.DataFrame([{"path": p, "label": label, "sha256": p}
                          for p, label in iter_image_files(root)])
    return prepare_data(root, assign_splits(facts, SplitParams()),
                        DataParams(image_size=SIZE, channels=3))


def train_and_score(data, params, work: Path) -> dict:
    from visionops.core.config import AugmentParams
    from visionops.core.metrics import evaluate_model
    from visionops.core.training import train_model

    result = train_model(data, params, AugmentParams(), work, verbose=0)
    evaluation = evaluate_model(result.model, data.data_dir, data.test.paths, data.test.y,
                                data.class_names)
    return {"test_accuracy": evaluation.metrics["accuracy"], "epochs": result.epochs_run,
            "fit_s": result.fit_seconds, "model": result.model}


def main() -> None:
    from visionops.core.config import FineTuneParams, TrainParams
    from visionops.core.models import save_backbone_weights

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain-images", type=int, default=4000)
    parser.add_argument("--pretrain-epochs", type=int, default=8)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=6, help="on set B, in all")
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp(prefix="visionops-transfer-"))
    make_photos(out / "a", args.pretrain_images, n_classes=10, size=128, seed=1)
    make_photos(out / "b", args.images, n_classes=10, size=128, seed=2)
    base = TrainParams(architecture="mobilenet_v3_small", batch_size=32,
                       learning_rate=1e-3, early_stopping_patience=100)

    started = time.perf_counter()
    source = train_and_score(prepared(out / "a"),
                             base.model_copy(update={"epochs": args.pretrain_epochs}),
                             out / "train-a")
    weights = save_backbone_weights(source.pop("model"), out / "set-a.weights.h5")
    print(f"set A ({args.pretrain_images:,} images): test accuracy "
          f"{source['test_accuracy']:.3f} after {source['epochs']} epochs "
          f"({time.perf_counter() - started:.0f} s); backbone weights -> {weights}", flush=True)

    small = prepared(out / "b")
    head_epochs = args.epochs // 2
    scratch = train_and_score(small, base.model_copy(update={"epochs": args.epochs}),
                              out / "train-scratch")
    pretrained = train_and_score(small, base.model_copy(update={
        "epochs": head_epochs, "pretrained": str(weights),
        "fine_tune": FineTuneParams(unfreeze_from=-30, epochs=args.epochs - head_epochs,
                                    learning_rate=1e-4)}), out / "train-pretrained")
    for result in (scratch, pretrained):
        result.pop("model")
    results = {"pretrain_images": args.pretrain_images, "images": args.images,
               "image_size": SIZE, "set_a": source, "scratch": scratch,
               "pretrained": pretrained,
               "pretrained_minus_scratch_points": 100 * (pretrained["test_accuracy"]
                                                         - scratch["test_accuracy"])}
    print(f"set B ({args.images:,} images, {len(small.test.y)} test): from scratch "
          f"{scratch['test_accuracy']:.3f}, pretrained on set A "
          f"{pretrained['test_accuracy']:.3f} ({args.epochs} epochs each)", flush=True)
    (HERE / "transfer.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
