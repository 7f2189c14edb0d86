import numpy as np
import pytest

from tasks.gate import gate_task
from visionops.core.config import GateParams
from visionops.core.gate import (
    FIRST_CHAMPION,
    PROMOTED,
    REJECTED,
    decide,
    mcnemar_exact,
    min_wins_for_significance,
)

PARAMS = GateParams(metric="f1_macro", min_accuracy=0.8, min_f1_macro=0.8, min_improvement=0.01)


def metrics(accuracy=0.9, f1_macro=0.9, **others):
    return {"accuracy": accuracy, "f1_macro": f1_macro, "precision_macro": 0.9,
            "recall_macro": 0.9} | others


def test_accuracy_floor_rejects_naming_metric_and_floor():
    decision = decide(metrics(accuracy=0.75), None, PARAMS)
    assert decision.decision == REJECTED
    assert not decision.promote
    assert decision.reason == "accuracy 0.7500 is below the floor 0.8000"


def test_both_floors_are_reported():
    decision = decide(metrics(accuracy=0.5, f1_macro=0.4), metrics(), PARAMS, "3")
    assert decision.decision == REJECTED
    assert "accuracy 0.5000 is below the floor 0.8000" in decision.reason
    assert "f1_macro 0.4000 is below the floor 0.8000" in decision.reason
    assert [c.passed for c in decision.checks] == [False, False]


def test_floor_applies_even_when_better_than_champion():
    decision = decide(metrics(f1_macro=0.79), metrics(f1_macro=0.5), PARAMS, "1")
    assert decision.decision == REJECTED
    assert "f1_macro 0.7900 is below the floor 0.8000" in decision.reason


def test_exactly_at_the_floor_passes():
    assert decide(metrics(accuracy=0.8, f1_macro=0.8), None, PARAMS).decision == FIRST_CHAMPION


def test_no_champion_and_floors_pass_makes_first_champion():
    decision = decide(metrics(), None, PARAMS)
    assert decision.decision == FIRST_CHAMPION
    assert decision.promote
    assert [c.name for c in decision.checks] == ["min_accuracy", "min_f1_macro"]


def test_improvement_at_least_min_improvement_promotes():
    decision = decide(metrics(f1_macro=0.95), metrics(f1_macro=0.93), PARAMS, "4")
    assert decision.decision == PROMOTED
    assert decision.promote
    assert "f1_macro 0.9500 vs champion v4 0.9300" in decision.reason
    assert "(+0.0200)" in decision.reason
    improvement = decision.checks[-1]
    assert improvement.name == "min_improvement_f1_macro"
    assert improvement.value == pytest.approx(0.02)
    assert improvement.passed


@pytest.mark.parametrize("challenger_f1", [0.935, 0.93, 0.90])
def test_small_or_negative_improvement_is_rejected(challenger_f1):
    decision = decide(metrics(f1_macro=challenger_f1), metrics(f1_macro=0.93), PARAMS, "4")
    assert decision.decision == REJECTED
    assert not decision.promote
    assert "below min_improvement 0.01" in decision.reason
    assert decision.reason.endswith("champion kept")


def test_gate_metric_param_is_respected():
    # f1 improves a lot, accuracy not at all: only the configured metric counts
    challenger = metrics(accuracy=0.90, f1_macro=0.99)
    champion = metrics(accuracy=0.90, f1_macro=0.85)
    by_f1 = decide(challenger, champion, PARAMS, "2")
    by_accuracy = decide(challenger, champion, PARAMS.model_copy(update={"metric": "accuracy"}),
                         "2")
    assert by_f1.decision == PROMOTED
    assert by_accuracy.decision == REJECTED
    assert by_accuracy.reason.startswith("accuracy 0.9000 vs champion v2 0.9000")
    assert by_accuracy.checks[-1].name == "min_improvement_accuracy"


def test_precision_metric_can_gate():
    params = PARAMS.model_copy(update={"metric": "precision_macro"})
    decision = decide(metrics(precision_macro=0.97), metrics(precision_macro=0.9), params, "1")
    assert decision.decision == PROMOTED


def test_zero_min_improvement_promotes_a_tie():
    params = PARAMS.model_copy(update={"min_improvement": 0.0})
    assert decide(metrics(), metrics(), params, "1").decision == PROMOTED


def test_to_dict_and_task():
    decision = gate_task.fn(metrics(), None, PARAMS)
    as_dict = decision.to_dict()
    assert as_dict["decision"] == FIRST_CHAMPION
    assert as_dict["checks"][0] == {"name": "min_accuracy", "value": 0.9, "threshold": 0.8,
                                    "passed": True}


def test_improvement_of_exactly_min_improvement_promotes():
    decision = decide(metrics(f1_macro=0.94), metrics(f1_macro=0.93), PARAMS, "1")
    assert decision.decision == PROMOTED, decision.reason


def test_a_collapsed_class_is_rejected_by_the_class_recall_floor():
    decision = decide(metrics(), None, PARAMS, class_recall={"cat": 0.95, "dog": 0.2})
    assert decision.decision == REJECTED
    assert decision.reason == "recall of class 'dog' 0.2000 is below the floor 0.5000"
    assert decision.checks[-1].name == "min_class_recall" and not decision.checks[-1].passed


def test_mcnemar_exact_counts_and_p_value():
    challenger = np.array([True] * 10 + [False] * 2 + [True] * 5)
    champion = np.array([False] * 10 + [False] * 2 + [True] * 5)
    b, c, p_value = mcnemar_exact(challenger, champion)
    assert (b, c) == (10, 0)
    assert p_value == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(champion, champion) == (0, 0, 1.0)


def test_noise_level_gain_is_refused_by_the_significance_test():
    # 3 images only the challenger gets right, 1 only the champion: +2 of 100 correct
    challenger = np.array([True] * 3 + [False] + [True] * 96)
    champion = np.array([False] * 3 + [True] + [True] * 96)
    decision = decide(metrics(f1_macro=0.97), metrics(f1_macro=0.95), PARAMS, "4",
                      paired_correct=(challenger, champion))
    assert decision.decision == REJECTED
    assert "not significant" in decision.reason and "p=0.3125" in decision.reason
    assert decision.mcnemar == {"b": 3, "c": 1, "p_value": pytest.approx(0.3125)}
    assert decision.power == {"test_images": 100, "champion_errors": 3, "min_wins": 5,
                              "can_win": False}
    assert ("the gate cannot promote on this test split: champion errs on 3 of 100 test "
            "images; a significant win needs >= 5 challenger-only correct: add test images "
            "or relax gate.significance (0.05)") in decision.reason


def test_significant_gain_is_promoted():
    challenger = np.array([True] * 12 + [True] * 88)
    champion = np.array([False] * 12 + [True] * 88)
    decision = decide(metrics(f1_macro=0.99), metrics(f1_macro=0.87), PARAMS, "4",
                      paired_correct=(challenger, champion))
    assert decision.decision == PROMOTED
    assert "McNemar exact one-sided p=0.0002441" in decision.reason
    assert decision.power["can_win"] and "cannot promote" not in decision.reason


def test_the_fewest_wins_a_significant_gain_needs():
    assert [min_wins_for_significance(s) for s in (0.05, 0.01, 0.5)] == [5, 7, 2]


def test_a_real_gain_on_a_realistic_split_is_promoted():
    # 1,000 test images, champion 97% right; the challenger fixes 9 and breaks 2
    champion = np.array([False] * 30 + [True] * 970)
    challenger = champion.copy()
    challenger[:9] = True
    challenger[100:102] = False
    decision = decide(metrics(f1_macro=0.977), metrics(f1_macro=0.967), PARAMS, "4",
                      paired_correct=(challenger, champion))
    assert decision.decision == PROMOTED, decision.reason
    assert decision.mcnemar["p_value"] == pytest.approx(0.03271484375)


def test_a_split_too_small_to_ever_promote_is_named_even_when_the_gain_is_too_small():
    champion = np.array([False] * 2 + [True] * 254)
    decision = decide(metrics(f1_macro=0.95), metrics(f1_macro=0.95), PARAMS, "4",
                      paired_correct=(champion, champion))
    assert decision.decision == REJECTED
    assert "champion errs on 2 of 256 test images" in decision.reason


def test_a_decision_names_every_check_and_its_figures_for_the_run():
    decision = decide({"accuracy": 0.9, "f1_macro": 0.9}, {"accuracy": 0.8, "f1_macro": 0.8},
                      GateParams(significance=0.05), "1", {"0": 0.9, "1": 0.9},
                      (np.array([True] * 40 + [False] * 10), np.array([False] * 40 + [True] * 10)))
    tags, metrics = decision.run_tags(), decision.run_metrics()
    assert tags["decision"] == decision.decision and tags["reason"] == decision.reason
    assert {name for name in tags if name.startswith("gate.")} >= {
        f"gate.{check.name}" for check in decision.checks}
    assert tags["gate.can_win"] in ("true", "false")
    assert metrics["mcnemar_b"] == 40 and metrics["mcnemar_c"] == 10
    assert metrics["gate_min_wins"] >= 1
