"""The update engine: every group gets the gradient of exactly its own terms, in the fewest backward passes."""

from __future__ import annotations

import pytest
import torch

from synth.core.updates import ParamGroup, Term, UpdateDeclarationError, UpdateEngine, make_optimizers, term


def _toy():
    torch.manual_seed(0)
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    c = torch.randn(3, requires_grad=True)
    groups = {"a": ParamGroup([a], lr=0.1), "b": ParamGroup([b], lr=0.1), "c": ParamGroup([c], lr=0.1)}
    return a, b, c, groups


def test_each_group_gets_the_gradient_of_exactly_the_terms_that_name_it(engine_gradients):
    a, b, c, groups = _toy()
    shared = (a * b).sum() ** 2  # depends on a and b
    only_a = (a * b * 3).sum()  # depends on a and b, but updates a only (like L_scr reaching the latents)
    own_c = (c**2).sum()
    terms = {"shared": term(shared, "a", "b"), "only_a": term(only_a, "a"), "own_c": term(own_c, "c")}
    expected_a = torch.autograd.grad(shared + only_a, a, retain_graph=True)[0]
    expected_b = torch.autograd.grad(shared, b, retain_graph=True)[0]
    leaked_b = torch.autograd.grad(shared + only_a, b, retain_graph=True)[0]
    expected_c = torch.autograd.grad(own_c, c, retain_graph=True)[0]
    engine = UpdateEngine()
    grads = engine_gradients(engine, terms, groups)
    assert torch.allclose(grads["a"][0], expected_a)
    assert torch.allclose(grads["b"][0], expected_b)
    assert torch.allclose(grads["c"][0], expected_c)
    # b must not see only_a's gradient, which is not zero: the engine needed a second pass for it.
    assert not torch.allclose(grads["b"][0], leaked_b)
    assert engine.passes_run == 2


def test_one_pass_when_no_excluded_term_reaches_a_group(engine_gradients):
    """D2CIP without L_scr: L_zcr depends on the latents only, so one backward serves generator and latents."""
    a, b, _, groups = _toy()
    gmi = (a.sin() * b).sum()
    zcr = (b**3).sum()  # updates b only and does not depend on a
    terms, pair = {"gmi": term(gmi, "a", "b"), "zcr": term(zcr, "b")}, {"a": groups["a"], "b": groups["b"]}
    expected_a = torch.autograd.grad(gmi, a, retain_graph=True)[0]
    expected_b = torch.autograd.grad(gmi + zcr, b, retain_graph=True)[0]
    engine = UpdateEngine()
    plan = engine.plan(terms, pair)
    assert len(plan) == 1 and set(plan[0].groups) == {"a", "b"}
    grads = engine_gradients(engine, terms, pair)
    assert torch.allclose(grads["a"][0], expected_a)
    assert torch.allclose(grads["b"][0], expected_b)
    assert engine.passes_run == 1


def test_the_engine_steps_the_optimisers_and_parameters_move():
    a, b, _, groups = _toy()
    before = a.detach().clone(), b.detach().clone()
    pair = {"a": groups["a"], "b": groups["b"]}
    UpdateEngine().apply({"loss": term((a * b).sum(), "a")}, pair, make_optimizers(pair))
    assert not torch.equal(a.detach(), before[0])  # updated
    assert torch.equal(b.detach(), before[1])  # named by no term: untouched
    assert a.grad is None  # zeroed after the step


def test_undeclared_and_misdeclared_terms_are_errors():
    a, b, _, groups = _toy()
    engine = UpdateEngine()
    with pytest.raises(UpdateDeclarationError, match="'bare' is a Tensor; declare"):
        engine.plan({"bare": (a * b).sum()}, groups)
    with pytest.raises(UpdateDeclarationError, match="'x' updates 'heads'.*groups are 'a', 'b', 'c'"):
        engine.plan({"x": term((a * b).sum(), "heads")}, groups)
    with pytest.raises(UpdateDeclarationError, match="at least one parameter group"):
        Term((a * b).sum(), frozenset())
    with pytest.raises(UpdateDeclarationError, match="scalar"):
        term(a * b, "a")
