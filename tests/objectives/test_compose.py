"""Composition of objectives: weighted sums, combine, with_, custom terms, transforms, parsing and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpref.objectives import PAIRWISE, Objective, combine, objective, parse_objective

from .helpers import (
    assert_close,
    assert_grads_close,
    assert_tree_close,
    make_inputs,
    numerical_grad,
    reference,
    stack,
    to_jax,
)

RPO_INPUTS = make_inputs("ipo", 8)  # policy, reference and both lengths


def rpo():
    return objective("sigmoid") + 0.2 * objective("sft")


def margin_penalty(policy_chosen_logps, policy_rejected_logps, margin=1.0):
    """A custom term: squared distance of the policy's log-prob margin from ``margin``."""
    return jnp.square(policy_chosen_logps - policy_rejected_logps - margin)


def margin_penalty_reference(inputs, margin=1.0):
    return (inputs["policy_chosen_logps"] - inputs["policy_rejected_logps"] - margin) ** 2


def test_weighted_sum_follows_trl_loss_weights_rule():
    losses, metrics = rpo()(**RPO_INPUTS)
    sigmoid, sft = reference("sigmoid", RPO_INPUTS), reference("sft", RPO_INPUTS)
    assert_close(losses, sigmoid + 0.2 * sft)
    assert_close(metrics["loss/sigmoid"], sigmoid)
    assert_close(metrics["loss/sft"], sft)
    # TRL: loss = sum_k w_k * mean_B(loss_k), with sft the token-mean NLL of the batch's chosen tokens.
    token_mean_nll = -RPO_INPUTS["policy_chosen_logps"].sum() / RPO_INPUTS["chosen_lengths"].sum()
    assert float(jnp.mean(losses)) == pytest.approx(sigmoid.mean() + 0.2 * token_mean_nll, rel=1e-6)
    assert_close(
        metrics["rewards/chosen"], 0.1 * (RPO_INPUTS["policy_chosen_logps"] - RPO_INPUTS["ref_chosen_logps"])
    )


@pytest.mark.parametrize("weights", [None, [1.0, 0.5, 0.2]])
def test_combine_weights_terms(weights):
    names = ["sigmoid", "ipo", "sft"]
    combined = combine([objective(n) for n in names], weights)
    losses, metrics = combined(**RPO_INPUTS)
    expected = sum(w * reference(n, RPO_INPUTS) for w, n in zip(weights or [1.0] * 3, names))
    assert_close(losses, expected)
    assert {f"loss/{n}" for n in names} <= set(metrics)


def test_arithmetic_and_repr():
    sigmoid, sft = objective("sigmoid", beta=0.1), objective("sft")
    assert repr(rpo()) == "Objective(1.0 * sigmoid() + 0.2 * sft())"
    assert repr(sigmoid - 2 * sft) == "Objective(1.0 * sigmoid(beta=0.1) + -2.0 * sft())"
    assert repr(sum([sigmoid, sft])) == "Objective(1.0 * sigmoid(beta=0.1) + 1.0 * sft())"
    assert_close(
        (sigmoid - sft)(**RPO_INPUTS)[0], reference("sigmoid", RPO_INPUTS) - reference("sft", RPO_INPUTS)
    )


def test_repeated_terms_get_distinct_metric_names():
    losses, metrics = (objective("sigmoid") + objective("sigmoid", beta=0.5))(**RPO_INPUTS)
    assert_close(metrics["loss/sigmoid"], reference("sigmoid", RPO_INPUTS))
    assert_close(metrics["loss/sigmoid_1"], reference("sigmoid", RPO_INPUTS, beta=0.5))
    assert_close(losses, metrics["loss/sigmoid"] + metrics["loss/sigmoid_1"])


def test_with_sets_hyperparameters_on_terms_that_accept_them():
    updated = rpo().with_(beta=0.5)
    assert repr(updated) == "Objective(1.0 * sigmoid(beta=0.5) + 0.2 * sft())"
    losses, _ = updated(**RPO_INPUTS)
    assert_close(losses, reference("sigmoid", RPO_INPUTS, beta=0.5) + 0.2 * reference("sft", RPO_INPUTS))


def test_terms_only_receive_the_inputs_they_read():
    """mmpo's qualities must not reach the sigmoid term, which would reject them as hyperparameters."""
    inputs = make_inputs("mmpo", 8)
    losses, _ = (objective("sigmoid") + objective("mmpo", gamma=2.0))(**inputs)
    assert_close(losses, reference("sigmoid", inputs) + reference("mmpo", inputs, gamma=2.0))


def test_custom_function_term():
    custom = Objective.from_fn(margin_penalty, margin=2.0)
    composed = objective("sigmoid") + 0.5 * custom
    losses, metrics = composed(**RPO_INPUTS)
    penalty = margin_penalty_reference(RPO_INPUTS, margin=2.0)
    assert_close(metrics["loss/margin_penalty"], penalty)
    assert_close(losses, reference("sigmoid", RPO_INPUTS) + 0.5 * penalty)
    # with_ reaches the custom term's own hyperparameters.
    assert_close(
        composed.with_(margin=3.0)(**RPO_INPUTS)[1]["loss/margin_penalty"],
        margin_penalty_reference(RPO_INPUTS, margin=3.0),
    )


def test_custom_function_metrics_are_merged():
    def with_metrics(policy_chosen_logps, **_):
        return -policy_chosen_logps, {"custom/logps": policy_chosen_logps}

    losses, metrics = Objective.from_fn(with_metrics, name="nll")(**RPO_INPUTS)
    assert_close(losses, -RPO_INPUTS["policy_chosen_logps"])
    assert_close(metrics["custom/logps"], RPO_INPUTS["policy_chosen_logps"])
    assert_close(metrics["loss/nll"], losses)


def test_composed_objective_under_jit_grad_and_vmap():
    composed = rpo() + 0.5 * Objective.from_fn(margin_penalty)

    def composed_reference(inputs):
        return (
            reference("sigmoid", inputs)
            + 0.2 * reference("sft", inputs)
            + 0.5 * margin_penalty_reference(inputs)
        )

    keys = ("policy_chosen_logps", "policy_rejected_logps")
    inputs = to_jax(RPO_INPUTS)
    grad = jax.jit(jax.grad(lambda policy: composed(**{**inputs, **policy})[0].sum()))(
        {k: inputs[k] for k in keys}
    )
    assert_grads_close(grad, numerical_grad(composed_reference, RPO_INPUTS, keys))

    batches = [make_inputs("ipo", 3, seed) for seed in (0, 1)]
    mapped = jax.jit(jax.vmap(lambda x: composed(**x)))(to_jax(stack(batches)))
    for i, batch in enumerate(batches):
        assert_tree_close(jax.tree_util.tree_map(lambda x: x[i], mapped), composed(**batch))


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: objective("not_an_objective"), "`name`"),
        (lambda: objective("sigmoid", betta=0.1), "betta"),
        (lambda: rpo().with_(temperature=1.0), "`temperature`"),
        (lambda: combine([objective("sigmoid"), objective("sft")], [1.0]), "`weights`"),
        (lambda: combine([]), "`objectives`"),
        (lambda: objective("sigmoid", beta="abc"), "`beta`='abc' of objective 'sigmoid' must be a number"),
        (lambda: objective("sigmoid", f_divergence_type=1.0), "must be a string"),
    ],
    ids=[
        "unknown-name",
        "unknown-hparam",
        "with-unknown",
        "weights-length",
        "empty",
        "string-number",
        "number-string",
    ],
)
def test_construction_errors_name_the_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "obj,keys",
    [
        (rpo(), RPO_INPUTS),
        (Objective.from_fn(margin_penalty), ["policy_chosen_logps", "policy_rejected_logps"]),
    ],
    ids=["registered", "custom"],
)
def test_input_no_term_reads_is_an_error(obj, keys):
    inputs = {key: RPO_INPUTS[key] for key in keys}
    obj(**inputs)  # fine without the extra input
    with pytest.raises(ValueError, match=r"\['policy_logps'\]"):
        obj(**inputs, policy_logps=np.zeros(8))


@pytest.mark.parametrize(
    "text,built",
    [
        ("sigmoid + 0.2*sft", lambda: rpo().with_(beta=0.5)),
        ("  sigmoid+0.2 * sft ", lambda: rpo().with_(beta=0.5)),
        ("ipo", lambda: objective("ipo", beta=0.5)),
        (
            "1e-1*sigmoid + -0.5*ipo",
            lambda: (0.1 * objective("sigmoid") - 0.5 * objective("ipo")).with_(beta=0.5),
        ),
    ],
)
def test_parse_objective_builds_what_the_python_api_builds(text, built):
    parsed = parse_objective(text, beta=0.5)
    assert repr(parsed) == repr(built())
    assert_tree_close(parsed(**RPO_INPUTS), built()(**RPO_INPUTS))


def test_parse_objective_gives_each_hyperparameter_to_the_terms_that_accept_it():
    assert repr(parse_objective("simpo + 0.5*sft", gamma=0.3, beta=1.0)) == (
        "Objective(1.0 * simpo(gamma=0.3, beta=1.0) + 0.5 * sft())"
    )
    assert repr(parse_objective("sft")) == "Objective(1.0 * sft())"


@pytest.mark.parametrize(
    "text,names,hparams,match",
    [
        (
            "sigmoid + 0.2*sfft",
            None,
            {},
            r"'sfft' in objective 'sigmoid \+ 0.2\*sfft' is not a known objective",
        ),
        ("kto", PAIRWISE, {}, r"use one of \['alphapo', 'aot', .*'sigmoid'"),  # not of this kind of run
        ("sigmoid + ", None, {}, "'' in objective"),
        ("sigmoid + abc*sft", None, {}, r"Weight 'abc' of 'sft' .* not a finite number .*`weight\*name`"),
        ("sigmoid + inf*sft", None, {}, "Weight 'inf'"),
        ("sigmoid + 0.2*sft", None, {"gamma": 1.0}, r"No term of .* accepts hyperparameter\(s\) \['gamma'\]"),
        ("sigmoid", None, {"beta": "abc"}, "`beta`='abc' of objective 'sigmoid' must be a number"),
    ],
    ids=[
        "unknown-name",
        "other-kind",
        "empty-term",
        "bad-weight",
        "infinite-weight",
        "unused-hparam",
        "bad-type",
    ],
)
def test_parse_objective_errors_say_what_is_wrong(text, names, hparams, match):
    with pytest.raises(ValueError, match=match):
        parse_objective(text, names, **hparams)


@pytest.mark.parametrize(
    "value, problem",
    [(-1.0, "must be > 0"), (float("inf"), "must be finite"), (float("nan"), "must be finite"),
     ([1], "must be a number"), ("abc", "must be a number")],
)  # fmt: skip
def test_bad_hyperparameter_values_fail_when_the_objective_is_built(value, problem):
    with pytest.raises(ValueError, match=f"`beta`=.* of objective 'sigmoid' {problem}"):
        objective("sigmoid", beta=value)
