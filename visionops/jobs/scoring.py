"""Score registered versions on the current test split (the same split the flow uses)."""

from __future__ import annotations

from visionops.core.config import Params
from visionops.io.registry import Registry


def current_test_split(params: Params):
    """(test paths, integer labels, class names) of the dataset as it is now, split as
    the flow splits it: without the files validation leaves out of training. Nothing on
    disk changes (a `fix` policy is the flow's)."""
    from visionops.core.split import assign_splits, class_names_of, split_labels
    from visionops.io.validation import collect_facts, validate_facts

    facts = collect_facts(params.data_dir, params.validation.max_side)
    report = validate_facts(params.data_dir, facts, params.validation)
    facts = facts.assign(excluded=facts["path"].map(report.excluded).fillna(""))
    table = assign_splits(facts, params.split)
    class_names = class_names_of(table)
    paths, y = split_labels(table, "test", class_names)
    return paths, y, class_names


def compare_versions(params: Params, versions: list[str]) -> dict:
    from visionops.core.gate import mcnemar_exact
    from visionops.core.metrics import evaluate_model
    from visionops.io.dataset import content_hash
    from visionops.io.models import load_registered_version

    registry = Registry(params)
    names = [str(registry.version(v).version) for v in versions]
    paths, y, class_names = current_test_split(params)
    evaluations = {}
    for version in names:
        loaded = load_registered_version(params, version)
        evaluations[version] = evaluate_model(loaded.model, params.data_dir, paths, y,
                                              class_names, loaded.class_names,
                                              loaded.input_contract)
    b, c, p_value = mcnemar_exact(*(evaluations[v].predictions == y for v in names[:2]))
    return {
        "versions": names, "test_images": len(paths),
        "data_version": content_hash(params.data_dir),
        "metrics": {metric: {v: evaluations[v].metrics[metric] for v in names}
                    for metric in evaluations[names[0]].metrics},
        "mcnemar": {"b": b, "c": c, "p_value": p_value},
    }
