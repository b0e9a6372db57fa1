"""Exact values of the seven scalarizers (docs/design.md), against numbers worked out by hand."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from morlaif.errors import InputError
from morlaif.scalarize import NAMES, normalize, scalarize, weight_vector

# Two rows, odd K = 3, negative rewards in the first row, an all-zero second row.
R3 = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 0.0]])
W3 = torch.tensor([1.0, 1.0, 2.0])  # normalised: [0.25, 0.25, 0.5]
# Even K = 4.
R4 = torch.tensor([[4.0, -1.0, 2.0, 0.0], [-3.0, -3.0, 5.0, 1.0]])


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def close(a, b):
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32)
    assert torch.allclose(a, b, atol=1e-5), (a, b)


def test_linear():
    close(scalarize("linear", R3), [2 / 3, 0.0])
    close(scalarize("linear", R3, W3), [0.25 - 0.5 + 1.5, 0.0])
    close(scalarize("linear", R4), [5 / 4, 0.0])


def test_max_min():
    close(scalarize("max_min", R3), [-2.0, 0.0])
    close(scalarize("max_min", R3, W3), [-2.0, 0.0])  # weights do not enter
    close(scalarize("max_min", R4), [-1.0, -3.0])


def test_soft_max_min_tau_and_weights():
    e = math.exp
    close(scalarize("soft_max_min", R3), [-math.log((e(-1) + e(2) + e(-3)) / 3), 0.0])
    close(scalarize("soft_max_min", R3, tau=2.0), [-2 * math.log((e(-0.5) + e(1) + e(-1.5)) / 3), 0.0])
    close(scalarize("soft_max_min", R3, W3), [-math.log(0.25 * e(-1) + 0.25 * e(2) + 0.5 * e(-3)), 0.0])
    # τ -> 0 approaches the minimum, large τ the weighted mean.
    close(scalarize("soft_max_min", R3, tau=0.01), [-2.0 + 0.01 * math.log(3), 0.0])
    assert abs(scalarize("soft_max_min", R3, tau=1e4)[0].item() - 2 / 3) < 1e-3


def test_soft_max_min_zero_weight_drops_objective():
    close(scalarize("soft_max_min", R3, [1.0, 0.0, 1.0]), [-math.log((math.exp(-1) + math.exp(-3)) / 2), 0.0])


def test_uncertainty_weighted_lam_and_weights():
    # mean 2/3; squared deviations (1/3)², (8/3)², (7/3)² average 114/27.
    close(scalarize("uncertainty_weighted", R3), [2 / 3 - 0.5 * 114 / 27, 0.0])
    close(scalarize("uncertainty_weighted", R3, lam=0.0), [2 / 3, 0.0])
    # weighted: r̄ = 1.25; deviations -0.25, -3.25, 1.75 -> 0.25*0.0625 + 0.25*10.5625 + 0.5*3.0625 = 4.1875
    close(scalarize("uncertainty_weighted", R3, W3, lam=1.0), [1.25 - 4.1875, 0.0])
    # K = 4: mean 1.25, squared deviations 7.5625, 5.0625, 0.5625, 1.5625 -> 14.75/4
    close(scalarize("uncertainty_weighted", R4, lam=2.0)[0], 1.25 - 2 * 14.75 / 4)


def test_lower_quantile_q():
    close(scalarize("lower_quantile", R3), [-2.0, 0.0])  # ⌈3/3⌉ = 1 smallest
    close(scalarize("lower_quantile", R3, q=0.5), [-0.5, 0.0])  # ⌈1.5⌉ = 2: mean(-2, 1)
    close(scalarize("lower_quantile", R3, q=1.0), [2 / 3, 0.0])
    close(scalarize("lower_quantile", R4), [-0.5, -3.0])  # ⌈4/3⌉ = 2: mean(-1, 0); mean(-3, -3)
    close(scalarize("lower_quantile", R4, q=0.75), [1 / 3, -5 / 3])
    r6 = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    close(scalarize("lower_quantile", r6), [1.5])  # q K = 2 exactly: float noise must not make it 3
    close(scalarize("lower_quantile", r6, q=0.01), [1.0])  # at least one
    close(scalarize("lower_quantile", R3, W3), [-2.0, 0.0])  # weights do not enter


def test_max_median_odd_and_even():
    close(scalarize("max_median", R3), [1.0, 0.0])
    close(scalarize("max_median", R4), [1.0, -1.0])  # mean of the two middle: (0 + 2)/2, (-3 + 1)/2
    close(scalarize("max_median", torch.tensor([[2.0, -7.0]])), [-2.5])


def test_bernoulli_nash():
    close(scalarize("bernoulli_nash", R3), [(logsig(1) + logsig(-2) + logsig(3)) / 3, logsig(0)])
    close(scalarize("bernoulli_nash", R3, W3), [0.25 * logsig(1) + 0.25 * logsig(-2) + 0.5 * logsig(3), math.log(0.5)])
    # very negative rewards: log σ(r) ≈ r, not -inf
    close(scalarize("bernoulli_nash", torch.tensor([[-1000.0, -200.0]])), [-600.0])


@pytest.mark.parametrize("name", NAMES)
def test_k1(name):
    r = torch.tensor([[-1.5], [0.0], [2.0]])
    want = [logsig(-1.5), logsig(0.0), logsig(2.0)] if name == "bernoulli_nash" else [-1.5, 0.0, 2.0]
    close(scalarize(name, r), want)
    close(scalarize(name, r, [3.0]), want)


@pytest.mark.parametrize("name", NAMES)
def test_rows_independent_of_batch(name):
    # The reference code reduced over the batch; each row here depends on that row only.
    full = scalarize(name, R4, [1.0, 2.0, 3.0, 4.0])
    for i in range(len(R4)):
        close(scalarize(name, R4[i : i + 1], [1.0, 2.0, 3.0, 4.0]), [full[i].item()])


def test_bad_input():
    for bad in ([1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 1.0], [[1.0, 1.0, 1.0]], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError):
            scalarize("linear", R3, bad)
    with pytest.raises(ValueError):
        scalarize("nope", R3)
    with pytest.raises(ValueError):
        scalarize("linear", torch.tensor([1.0, 2.0]))  # not (B, K)
    with pytest.raises(ValueError):
        scalarize("soft_max_min", R3, tau=0.0)
    with pytest.raises(ValueError):
        scalarize("lower_quantile", R3, q=1.5)
    with pytest.raises(ValueError):
        scalarize("linear", R3, alpha=1.0)


def test_normalize_and_floor():
    r = torch.tensor([[1.0, 10.0], [3.0, 10.0]])
    close(normalize(r, [2.0, 10.0], [1.0, 0.0]), [[-1.0, 0.0], [1.0, 0.0]])
    close(normalize(r, [0.0, 0.0], [2.0, 1e-9], min_std=0.5), [[0.5, 20.0], [1.5, 20.0]])
    with pytest.raises(ValueError):
        normalize(r, [0.0], [1.0])


def test_weight_vector():
    assert weight_vector(None, ["a", "b"]) is None
    close(weight_vector({"b": 2.0}, ["a", "b", "c"]), [0.0, 2.0, 0.0])
    with pytest.raises(InputError):
        weight_vector({"z": 1.0}, ["a"])
    with pytest.raises(InputError):
        weight_vector({"a": 0.0}, ["a"])


finite = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def reward_batches(draw):
    B = draw(st.integers(1, 5))
    K = draw(st.integers(1, 7))
    r = torch.tensor(draw(st.lists(st.lists(finite, min_size=K, max_size=K), min_size=B, max_size=B)))
    w = draw(st.one_of(st.none(), st.lists(st.floats(0.01, 100.0), min_size=K, max_size=K)))
    return r, w


@settings(max_examples=60, deadline=None)
@given(reward_batches(), st.sampled_from(NAMES), st.floats(0.05, 20.0), st.floats(0.0, 5.0), st.floats(0.01, 1.0))
def test_properties(batch, name, tau, lam, q):
    r, w = batch
    out = scalarize(name, r, w, tau=tau, lam=lam, q=q)
    assert out.shape == (r.shape[0],)
    assert torch.isfinite(out).all()
    lo, hi = r.min(1).values, r.max(1).values
    tol = 1e-3 * (1 + r.abs().max(1).values)
    if name in ("max_min", "lower_quantile", "max_median", "soft_max_min", "linear"):
        assert (out >= lo - tol).all() and (out <= hi + tol).all()  # an average of rewards stays inside them
    if name == "soft_max_min":  # between the minimum and the weighted mean (Jensen)
        assert (out <= scalarize("linear", r, w) + tol).all()
    if name == "uncertainty_weighted":
        assert (out <= scalarize("linear", r, w) + tol).all()
    if name == "bernoulli_nash":
        assert (out <= 0).all()


@settings(max_examples=30, deadline=None)
@given(st.lists(finite, min_size=1, max_size=6), st.floats(0.05, 20.0), st.floats(0.0, 5.0), st.floats(0.01, 1.0))
def test_k1_identity_property(col, tau, lam, q):
    r = torch.tensor(col)[:, None]  # (B, 1)
    for name in NAMES:
        out = scalarize(name, r, tau=tau, lam=lam, q=q)
        want = torch.nn.functional.logsigmoid(r[:, 0]) if name == "bernoulli_nash" else r[:, 0]
        assert torch.allclose(out, want, rtol=1e-5, atol=1e-3)
