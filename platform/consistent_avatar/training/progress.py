"""Live progress of many actors' training on one tqdm bar in the driver.

Rank 0 of every trainer pushes (actor, stage, step, loss) to one :class:`ProgressBoard` Ray actor
(fire-and-forget, every ``log_every`` steps); the driver polls its snapshot while it waits for the
actors' tasks and moves one bar whose total is every planned optimiser step of every actor. The
postfix names what is running: ``actor_000 fcsd 1200/15000 loss 0.071``.
"""

from __future__ import annotations

from typing import Any

import ray
from tqdm.auto import tqdm


@ray.remote(num_cpus=0)
class ProgressBoard:
    """Latest step and loss per (actor, stage); planned steps per actor."""

    def __init__(self) -> None:
        self.plan: dict[str, dict[str, int]] = {}
        self.steps: dict[str, dict[str, int]] = {}
        self.loss: dict[str, float | None] = {}
        self.current: dict[str, str] = {}

    def set_plan(self, actor: str, plan: dict[str, int]) -> None:
        self.plan[actor] = dict(plan)
        self.steps.setdefault(actor, {})

    def update(self, actor: str, stage: str, step: int, loss: float | None = None) -> None:
        self.steps.setdefault(actor, {})[stage] = max(step, self.steps.get(actor, {}).get(stage, 0))
        self.current[actor] = stage
        if loss is not None:
            self.loss[actor] = loss

    def complete(self, actor: str) -> None:
        """Count an actor as done (finished, failed or skipped): its remaining steps are off the bar."""
        plan = self.plan.get(actor, {})
        self.steps[actor] = dict(plan)
        self.current.pop(actor, None)

    def snapshot(self) -> dict[str, Any]:
        return {"plan": self.plan, "steps": self.steps, "loss": self.loss, "current": self.current}


class ProgressBar:
    """The driver's bar over a :class:`ProgressBoard`."""

    def __init__(self, board: Any, enabled: bool = True) -> None:
        self.board = board
        self.bar = tqdm(total=0, unit="step", desc="training", disable=not enabled, dynamic_ncols=True)

    def refresh(self) -> None:
        snap = ray.get(self.board.snapshot.remote())
        total = sum(sum(p.values()) for p in snap["plan"].values())
        done = sum(
            min(snap["steps"].get(a, {}).get(s, 0), n) for a, plan in snap["plan"].items() for s, n in plan.items()
        )
        self.bar.total = max(total, done)
        self.bar.n = done
        parts = []
        for actor, stage in sorted(snap["current"].items()):
            step = snap["steps"].get(actor, {}).get(stage, 0)
            n = snap["plan"].get(actor, {}).get(stage, 0)
            loss = snap["loss"].get(actor)
            parts.append(f"{actor} {stage} {step}/{n}" + (f" loss {loss:.4g}" if loss is not None else ""))
        self.bar.set_postfix_str("; ".join(parts)[:200], refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
