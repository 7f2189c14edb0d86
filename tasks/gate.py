"""The promotion gate: absolute floors, then the challenger against the champion
on the same test split."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from prefect import task

from visionops.config import GateParams

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

    @property
    def promote(self) -> bool:
        return self.decision in (FIRST_CHAMPION, PROMOTED)

    def to_dict(self) -> dict:
        return asdict(self)


def decide(challenger: dict[str, float], champion: dict[str, float] | None,
           params: GateParams, champion_version: str | None = None) -> GateDecision:
    checks = [
        Check("min_accuracy", challenger["accuracy"], params.min_accuracy,
              challenger["accuracy"] >= params.min_accuracy),
        Check("min_f1_macro", challenger["f1_macro"], params.min_f1_macro,
              challenger["f1_macro"] >= params.min_f1_macro),
    ]
    failed = [c for c in checks if not c.passed]
    if failed:
        reason = "; ".join(f"{c.name.removeprefix('min_')} {c.value:.4f} is below the floor "
                           f"{c.threshold:.4f}" for c in failed)
        return GateDecision(REJECTED, reason, checks)
    if champion is None:
        return GateDecision(FIRST_CHAMPION, "no champion yet and every floor passed", checks)

    metric = params.metric
    delta = challenger[metric] - champion[metric]
    improved = round(delta, 9) >= params.min_improvement  # 0.94 - 0.93 is 0.00999... in floats
    checks.append(Check(f"min_improvement_{metric}", delta, params.min_improvement, improved))
    comparison = (f"{metric} {challenger[metric]:.4f} vs champion v{champion_version} "
                  f"{champion[metric]:.4f} on the same test split ({delta:+.4f})")
    if improved:
        return GateDecision(PROMOTED, f"{comparison} >= min_improvement "
                            f"{params.min_improvement}", checks)
    return GateDecision(REJECTED, f"{comparison} is below min_improvement "
                        f"{params.min_improvement}; champion kept", checks)


@task(name="Gate: challenger vs champion")
def gate_task(challenger: dict[str, float], champion: dict[str, float] | None,
              params: GateParams, champion_version: str | None = None) -> GateDecision:
    return decide(challenger, champion, params, champion_version)
