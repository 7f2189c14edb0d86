"""The promotion gate: absolute floors, then the challenger against the champion
on the same test split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from visionops.core.config import GateParams

FIRST_CHAMPION, PROMOTED, REJECTED = "first_champion", "promoted", "rejected"


@dataclass
class Check:
    name: str
    value: float
    threshold: float
    passed: bool


@dataclass
class GateDecision:
    decision: str
    reason: str
    checks: list[Check] = field(default_factory=list)
    mcnemar: dict | None = None  # b, c and p_value when the test ran
    power: dict | None = None    # what the test split lets the gate detect (GatePower)

    @property
    def promote(self) -> bool:
        return self.decision in (FIRST_CHAMPION, PROMOTED)

    def to_dict(self) -> dict:
        return asdict(self)

    def run_tags(self) -> dict[str, str]:
        """What a reviewer filters runs by: the decision, its reason, each check."""
        tags = {"decision": self.decision, "reason": self.reason,
                **{f"gate.{c.name}": "passed" if c.passed else "failed" for c in self.checks}}
        if self.power:
            tags["gate.can_win"] = str(self.power["can_win"]).lower()
        return tags

    def run_metrics(self) -> dict[str, float]:
        """The figures behind the decision: McNemar's counts and p-value, the gate's power."""
        metrics = {f"mcnemar_{k}": v for k, v in (self.mcnemar or {}).items()}
        if self.power:
            metrics |= {"gate_champion_errors": self.power["champion_errors"],
                        "gate_min_wins": self.power["min_wins"]}
        return metrics


def mcnemar_exact(challenger_correct: np.ndarray, champion_correct: np.ndarray,
                  alternative: str = "two-sided") -> tuple[int, int, float]:
    """McNemar's exact test on paired results: (challenger-only right, champion-only
    right, p-value). Images both got right or both got wrong say nothing. `alternative`
    "greater" asks only whether the challenger is better (the gate's question)."""
    from scipy.stats import binomtest

    challenger_correct = np.asarray(challenger_correct, dtype=bool)
    champion_correct = np.asarray(champion_correct, dtype=bool)
    b = int(np.sum(challenger_correct & ~champion_correct))
    c = int(np.sum(~challenger_correct & champion_correct))
    p_value = (1.0 if b + c == 0 else
               float(binomtest(b, b + c, 0.5, alternative=alternative).pvalue))
    return b, c, p_value


def min_wins_for_significance(significance: float) -> int:
    """The fewest challenger-only right images that can be significant: with none the
    other way, the one-sided exact p-value is 0.5 ** wins."""
    wins = 1
    while 0.5**wins >= significance:
        wins += 1
    return wins


@dataclass
class GatePower:
    """Whether this test split can show a significant win at all: only images the
    champion gets wrong can become challenger-only right."""
    test_images: int
    champion_errors: int
    min_wins: int

    @property
    def can_win(self) -> bool:
        return self.champion_errors >= self.min_wins

    def describe(self) -> str:
        return (f"champion errs on {self.champion_errors} of {self.test_images} test images; "
                f"a significant win needs >= {self.min_wins} challenger-only correct")

    def advice(self, significance: float) -> str:
        return (f"the gate cannot promote on this test split: {self.describe()}: "
                f"add test images or relax gate.significance ({significance})")


def decide(challenger: dict[str, float], champion: dict[str, float] | None,
           params: GateParams, champion_version: str | None = None,
           class_recall: dict[str, float] | None = None,
           paired_correct: tuple[np.ndarray, np.ndarray] | None = None) -> GateDecision:
    """`class_recall`: the challenger's recall per class; `paired_correct`: whether the
    challenger and the champion got each test image right, in the same order."""
    power = None if paired_correct is None else GatePower(
        len(paired_correct[1]), int(np.sum(~np.asarray(paired_correct[1], dtype=bool))),
        min_wins_for_significance(params.significance))
    power_figures = power and asdict(power) | {"can_win": power.can_win}
    checks = [
        Check("min_accuracy", challenger["accuracy"], params.min_accuracy,
              challenger["accuracy"] >= params.min_accuracy),
        Check("min_f1_macro", challenger["f1_macro"], params.min_f1_macro,
              challenger["f1_macro"] >= params.min_f1_macro),
    ]
    reasons = [f"{c.name.removeprefix('min_')} {c.value:.4f} is below the floor "
               f"{c.threshold:.4f}" for c in checks if not c.passed]
    if class_recall:
        weakest = min(class_recall, key=class_recall.get)
        recall_check = Check("min_class_recall", class_recall[weakest], params.min_class_recall,
                             class_recall[weakest] >= params.min_class_recall)
        checks.append(recall_check)
        reasons += [f"recall of class {name!r} {value:.4f} is below the floor "
                    f"{params.min_class_recall:.4f}" for name, value in sorted(
                        class_recall.items()) if value < params.min_class_recall]
    if reasons:
        return GateDecision(REJECTED, "; ".join(reasons), checks, power=power_figures)
    if champion is None:
        return GateDecision(FIRST_CHAMPION, "no champion yet and every floor passed", checks)

    metric = params.metric
    delta = challenger[metric] - champion[metric]
    improved = round(delta, 9) >= params.min_improvement  # 0.94 - 0.93 is 0.00999... in floats
    checks.append(Check(f"min_improvement_{metric}", delta, params.min_improvement, improved))
    comparison = (f"{metric} {challenger[metric]:.4f} vs champion v{champion_version} "
                  f"{champion[metric]:.4f} on the same test split ({delta:+.4f})")
    if not improved:
        reason = f"{comparison} is below min_improvement {params.min_improvement}; champion kept"
        if power and not power.can_win:
            reason += f"; {power.advice(params.significance)}"
        return GateDecision(REJECTED, reason, checks, power=power_figures)
    if power is not None:
        b, c, p_value = mcnemar_exact(*paired_correct, alternative="greater")
        significant = p_value < params.significance and b > c
        checks.append(Check("significance_mcnemar_p", p_value, params.significance,
                            significant))
        test = (f"McNemar exact one-sided p={p_value:.4g} (challenger-only right {b}, "
                f"champion-only {c})")
        decision = GateDecision(PROMOTED if significant else REJECTED, "", checks,
                                mcnemar={"b": b, "c": c, "p_value": p_value},
                                power=power_figures)
        decision.reason = (f"{comparison}; {test} < significance {params.significance}"
                           if significant else
                           f"{comparison}, but the gain is not significant: {test} >= "
                           f"significance {params.significance}; champion kept")
        if not significant and not power.can_win:
            decision.reason += f"; {power.advice(params.significance)}"
        return decision
    return GateDecision(PROMOTED, f"{comparison} >= min_improvement "
                        f"{params.min_improvement}", checks)

