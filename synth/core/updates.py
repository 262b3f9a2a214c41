"""Which loss term updates which parameters, and the fewest backward passes that do it exactly.

Every loss term of an inversion step is a :class:`Term`: its value and the names of the parameter groups
its gradient updates. A group's update loss is the sum of the terms that name it (D2CIP's Eq. 13 and 14 are
two such sums). A bare tensor, a term with no group or a group the step does not have is an error, never a
guess, so a new term can neither leak into another group's update nor be silently dropped.

:func:`apply_updates` computes every group's gradient of its own loss with as few backward passes as the
mathematics allows. One pass of the sum of *all* terms serves every group that no excluded term reaches:
a term that does not depend on a group's parameters adds nothing to their gradient. (D2CIP without L_scr:
L_zcr depends on the latents and h_z only, so one pass gives the generator its Eq. 14 gradient and the
latents their Eq. 13 gradient.) The groups left over get one pass per distinct update loss. Whether a term
reaches a group is read off the autograd graph, once per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch


class UpdateDeclarationError(ValueError):
    """A loss term without a valid declaration of the parameter groups it updates."""


@dataclass(frozen=True)
class Term:
    """A weighted loss term (a scalar) and the names of the parameter groups it updates."""

    value: torch.Tensor
    updates: frozenset[str]

    def __post_init__(self) -> None:
        if not isinstance(self.value, torch.Tensor) or self.value.dim() != 0:
            raise UpdateDeclarationError(f"a loss term must be a scalar tensor, got {type(self.value).__name__}"
                                         f"{list(self.value.shape) if isinstance(self.value, torch.Tensor) else ''}")
        if not self.updates:
            raise UpdateDeclarationError("a loss term must name at least one parameter group it updates")


def term(value: torch.Tensor, *updates: str) -> Term:
    """``Term(value, frozenset(updates))``: ``term(loss, "generator", "latents")``."""
    return Term(value, frozenset(updates))


@dataclass
class ParamGroup:
    """Tensors optimised together: by a fresh Adam (learning rate ``lr``) per batch, or by ``optimizer`` when
    given, whose state then persists across batches (CMI's projection head)."""

    params: list[torch.Tensor]
    lr: float
    betas: tuple[float, float] = (0.5, 0.999)
    optimizer: torch.optim.Optimizer | None = None


@dataclass
class BackwardPass:
    terms: tuple[str, ...]
    groups: tuple[str, ...]


@dataclass
class UpdateEngine:
    """Applies terms to parameter groups; :meth:`reset` at every new batch (new tensors, new graph shapes)."""

    passes_run: int = 0  # total backward passes, for tests and profiles
    _reach: dict[tuple[str, str], bool] = field(default_factory=dict)

    def reset(self) -> None:
        self._reach.clear()

    def check(self, terms: Mapping[str, object], groups: Mapping[str, ParamGroup]) -> None:
        for name, value in terms.items():
            if not isinstance(value, Term):
                raise UpdateDeclarationError(
                    f"loss term {name!r} is a {type(value).__name__}; declare the parameter groups it updates: "
                    f"term(value, {', '.join(repr(g) for g in groups)})")
            unknown = sorted(value.updates - set(groups))
            if unknown:
                raise UpdateDeclarationError(
                    f"loss term {name!r} updates {', '.join(map(repr, unknown))}, but this step's parameter groups "
                    f"are {', '.join(map(repr, groups)) or 'none'}")

    def plan(self, terms: Mapping[str, Term], groups: Mapping[str, ParamGroup]) -> list[BackwardPass]:
        """The backward passes that give every group the gradient of exactly its own terms."""
        self.check(terms, groups)
        wanted = {g: frozenset(n for n, t in terms.items() if g in t.updates) for g in groups}
        wanted = {g: names for g, names in wanted.items() if names}
        everything = frozenset(terms)
        shared = tuple(g for g, names in wanted.items()
                       if not any(self._reaches(terms, n, g, groups) for n in everything - names))
        passes = [BackwardPass(tuple(sorted(everything)), shared)] if shared else []
        rest: dict[frozenset[str], list[str]] = {}
        for g, names in wanted.items():
            if g not in shared:
                rest.setdefault(names, []).append(g)
        passes += [BackwardPass(tuple(sorted(names)), tuple(gs)) for names, gs in rest.items()]
        return passes

    def _reaches(self, terms: Mapping[str, Term], name: str, group: str, groups: Mapping[str, ParamGroup]) -> bool:
        key = (name, group)
        if key not in self._reach:
            leaves = _graph_leaves(terms[name].value)
            self._reach[key] = any(id(p) in leaves for p in groups[group].params)
        return self._reach[key]

    def apply(self, terms: Mapping[str, Term], groups: Mapping[str, ParamGroup],
              optimizers: Mapping[str, torch.optim.Optimizer],
              scaler: torch.amp.GradScaler | None = None) -> None:
        """Sets each group's ``.grad`` to the gradient of its update loss and steps its optimiser.

        ``scaler`` (fp16 only; ``zoo.Acceleration.grad_scaler``) multiplies every loss before its backward pass
        so small gradients do not underflow in fp16, unscales them before the step, and skips the steps of an
        iteration whose gradients overflowed (then lowers its scale)."""
        scaling = scaler is not None and scaler.is_enabled()
        passes = self.plan(terms, groups)
        for i, backward in enumerate(passes):
            params = [p for g in backward.groups for p in groups[g].params]
            loss = _sum(terms[n].value for n in backward.terms)
            if scaling:
                loss = scaler.scale(loss)
            grads = torch.autograd.grad(loss, params, retain_graph=i < len(passes) - 1, allow_unused=True)
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            self.passes_run += 1
        for backward in passes:
            for g in backward.groups:
                has_grad = any(p.grad is not None for p in groups[g].params)
                if scaling and has_grad:  # GradScaler.step refuses an optimiser with no gradient to check
                    scaler.step(optimizers[g])
                else:
                    optimizers[g].step()
                optimizers[g].zero_grad(set_to_none=True)
        if scaling:
            scaler.update()


def _sum(values: Iterable[torch.Tensor]) -> torch.Tensor:
    values = list(values)
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def _graph_leaves(value: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (parameters, latents) that ``value`` depends on through autograd."""
    if value.grad_fn is None:
        return {id(value)} if value.requires_grad else set()
    leaves: set[int] = set()
    seen: set[int] = set()
    stack = [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        variable = getattr(node, "variable", None)  # AccumulateGrad: the leaf it accumulates into
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


class KeptOptimizers:
    """Adam optimisers that outlive a batch, by key (a generator kept for the whole run keeps its momentum),
    saved with the method's resume state; a saved state waits until its group first asks for its optimiser."""

    def __init__(self) -> None:
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self._saved: dict[str, dict] = {}

    def attach(self, key: str, group: ParamGroup) -> torch.optim.Optimizer:
        """Sets ``group.optimizer`` to the run-long Adam of ``key``, created (or restored) on first use."""
        if key not in self.optimizers:
            optimizer = torch.optim.Adam(group.params, lr=group.lr, betas=group.betas)
            if key in self._saved:
                optimizer.load_state_dict(self._saved.pop(key))
            self.optimizers[key] = optimizer
        group.optimizer = self.optimizers[key]
        return group.optimizer

    def state_dict(self) -> dict[str, dict]:
        return {**self._saved, **{key: optimizer.state_dict() for key, optimizer in self.optimizers.items()}}

    def load_state_dict(self, state: Mapping[str, dict]) -> None:
        self._saved = dict(state)
        for key in [k for k in self._saved if k in self.optimizers]:
            self.optimizers[key].load_state_dict(self._saved.pop(key))


def make_optimizers(groups: Mapping[str, ParamGroup]) -> dict[str, torch.optim.Optimizer]:
    """One Adam per group, created per batch as CMI re-creates its optimiser for every synthesis round, unless
    the group brings its own persistent optimiser."""
    return {name: group.optimizer or torch.optim.Adam(group.params, lr=group.lr, betas=group.betas)
            for name, group in groups.items()}
