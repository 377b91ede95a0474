"""Tests of revnets.autograd.exact: bit-exact fixed-point scaling with an information buffer."""

import math
import time
import warnings
from fractions import Fraction

import pytest
import torch
from helpers import NO_KERNELS
from hypothesis import given, settings
from hypothesis import strategies as st

from revnets.autograd import kernels
from revnets.autograd.buffer import packbits, unpackbits
from revnets.autograd.exact import (
    MAX_DENOMINATOR,
    SAFE_LIMIT,
    InformationBuffer,
    add_exact,
    check_range,
    dequantize,
    exact_ratio,
    quantize,
    scale_add_exact,
    scale_exact,
    unscale_exact,
    unscale_sub_exact,
)

shapes = st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple)
seeds = st.integers(0, 2**31 - 1)
bases = st.integers(1, MAX_DENOMINATOR)


def randint(seed: int, low: int, high: int, shape: tuple[int, ...]) -> torch.Tensor:
    """int64 tensor of ``shape`` uniform in ``[low, high)``."""
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


@st.composite
def ratios(draw: st.DrawFn) -> Fraction:
    """Contractions, expansions, negative ratios and ±1, with numerator and denominator ≤ 2^16."""
    kind = draw(st.sampled_from(["contract", "expand", "negative", "one"]))
    if kind == "one":
        return Fraction(draw(st.sampled_from([1, -1])))
    d = draw(st.integers(1, MAX_DENOMINATOR))
    n = draw(st.integers(1, MAX_DENOMINATOR))
    if kind == "contract":
        d = max(d, 2)
        n = draw(st.integers(1, d - 1))
    elif kind == "expand":
        n = max(n, 2)
        d = draw(st.integers(1, n - 1))
    else:
        n = -n
    return Fraction(n, d)


def buffer_state(buffer: InformationBuffer) -> tuple[torch.Tensor, object, int]:
    """What must be restored exactly: a copy of the head, the identity of the stack top, the depth."""
    return buffer.head.clone(), buffer.top, buffer.depth


def assert_same_state(buffer: InformationBuffer, state: tuple[torch.Tensor, object, int]) -> None:
    head, top, depth = state
    assert torch.equal(buffer.head, head)
    assert buffer.top is top
    assert buffer.depth == depth


def assert_empty(buffer: InformationBuffer) -> None:
    assert buffer.bits() == 0
    assert buffer.depth == 0 and buffer.top is None
    assert not bool(buffer.head.any())


# --- scale_exact / unscale_exact -------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(seed=seeds, shape=shapes, ratio=ratios(), steps=st.integers(0, 300))
def test_scale_round_trip_is_bit_exact(
    seed: int, shape: tuple[int, ...], ratio: Fraction, steps: int
) -> None:
    growth = math.log2(abs(ratio))  # bits of magnitude gained per step (negative: contraction)
    if growth > 0:
        steps = min(steps, int(40 / growth))
    bound = 2 ** (44 - math.ceil(max(growth, 0.0) * steps)) if growth > 0 else 2**40
    q0 = randint(seed, -bound, bound + 1, shape)
    buffer = InformationBuffer.empty(q0)
    q = q0
    for _ in range(steps):
        q, buffer = scale_exact(q, ratio, buffer)
        assert q.dtype == torch.int64 and q.shape == q0.shape
    for _ in range(steps):
        q, buffer = unscale_exact(q, ratio, buffer)
    assert torch.equal(q, q0)
    assert_empty(buffer)


def test_scale_uses_floor_semantics_for_negative_values() -> None:
    q = torch.tensor([7, -7, -1, 0])
    scaled, buffer = scale_exact(q, Fraction(1, 2), InformationBuffer.empty(q))
    assert scaled.tolist() == [3, -4, -1, 0]  # ⌊q / 2⌋, not truncation
    assert buffer.head.tolist() == [1, 1, 1, 0]  # floor remainders, all in [0, 2)
    restored, buffer = unscale_exact(scaled, Fraction(1, 2), buffer)
    assert torch.equal(restored, q)
    assert_empty(buffer)


def test_scale_draws_buffer_bits_back_when_expanding() -> None:
    q = randint(0, -(2**30), 2**30, (64,))
    buffer = InformationBuffer.empty(q)
    q1, buffer = scale_exact(q, Fraction(1, 1024), buffer)  # buffer +10 bits per element
    q2, buffer = scale_exact(q1, Fraction(1024, 1), buffer)  # takes those bits back out
    assert torch.equal(q2, q)
    assert buffer.bits() == 0 and buffer.depth == 2  # the 10 bits went back into q
    q1b, buffer = unscale_exact(q2, Fraction(1024, 1), buffer)
    assert torch.equal(q1b, q1)
    q0, buffer = unscale_exact(q1b, Fraction(1, 1024), buffer)
    assert torch.equal(q0, q)
    assert_empty(buffer)


@pytest.mark.parametrize("ratio", [Fraction(1), Fraction(-1)])
def test_unit_ratio_keeps_the_buffer(ratio: Fraction) -> None:
    q = randint(1, -100, 100, (3, 4))
    buffer = InformationBuffer.empty(q)
    scaled, out = scale_exact(q, ratio, buffer)
    assert out is buffer
    assert torch.equal(scaled, q * ratio.numerator)
    restored, out = unscale_exact(scaled, ratio, out)
    assert out is buffer and torch.equal(restored, q)


def test_buffers_are_persistent_and_replayable() -> None:
    q0 = randint(2, -(2**40), 2**40, (5, 7))
    ratio = Fraction(3, 65521)  # ~14.4 bits per step: spills every few steps
    q, buffer = q0, InformationBuffer.empty(q0)
    saved = []
    for _ in range(40):
        saved.append((q, buffer, buffer_state(buffer)))
        q, buffer = scale_exact(q, ratio, buffer)
    assert buffer.top is not None
    for _, old, state in saved:  # later operations left every earlier buffer as it was
        assert_same_state(old, state)
    final = buffer_state(buffer)
    results = []
    for _ in range(2):  # replay the whole inversion twice from the same saved buffer
        q_inv, b = q, buffer
        for q_expected, _, state in reversed(saved):
            q_inv, b = unscale_exact(q_inv, ratio, b)
            assert torch.equal(q_inv, q_expected)
            assert_same_state(b, state)
        results.append(q_inv)
        assert_same_state(buffer, final)
    assert torch.equal(results[0], q0) and torch.equal(results[1], q0)


def test_ten_thousand_contractions_are_exact_and_near_the_information_floor() -> None:
    numel, layers, ratio = 1000, 10_000, Fraction(9, 10)
    magnitude = randint(3, 2**32, 2**34, (numel,))
    q0 = magnitude * (randint(4, 0, 2, (numel,)) * 2 - 1)
    q, buffer = q0, InformationBuffer.empty(q0)
    start = time.perf_counter()
    for _ in range(layers):
        q, buffer = scale_exact(q, ratio, buffer)
    forward_s = time.perf_counter() - start
    per_element_layer = buffer.bits() / (numel * layers)
    for _ in range(layers):
        q, buffer = unscale_exact(q, ratio, buffer)
    total_s = time.perf_counter() - start
    floor = math.log2(10 / 9)
    print(
        f"\nγ = 9/10, {layers} layers x {numel} elements: {per_element_layer:.4f} bits/element/layer"
        f" (floor {floor:.4f}); forward {forward_s:.2f} s, forward + inverse {total_s:.2f} s"
    )
    assert torch.equal(q, q0)
    assert_empty(buffer)
    assert floor * 0.99 < per_element_layer < 0.2


def test_range_is_checked_not_wrapped() -> None:
    buffer = InformationBuffer.empty(torch.zeros(2, dtype=torch.int64))
    with pytest.raises(OverflowError, match="scale_exact input"):
        scale_exact(torch.tensor([SAFE_LIMIT + 1, 0]), Fraction(9, 10), buffer)
    with pytest.raises(OverflowError, match="scale_exact result"):
        scale_exact(torch.tensor([SAFE_LIMIT // 2 + 1, 0]), Fraction(2), buffer)
    q, ok = scale_exact(torch.tensor([SAFE_LIMIT // 2, -SAFE_LIMIT // 2]), Fraction(2), buffer)
    assert q.tolist() == [SAFE_LIMIT, -SAFE_LIMIT]
    with pytest.raises(OverflowError, match="unscale_exact result"):
        unscale_exact(torch.tensor([SAFE_LIMIT // 2 + 1, 0]), Fraction(1, 2), ok)


def test_invalid_operands_are_rejected() -> None:
    q = torch.zeros(3, dtype=torch.int64)
    buffer = InformationBuffer.empty(q)
    with pytest.raises(ValueError, match="no push"):
        unscale_exact(q, Fraction(9, 10), buffer)
    with pytest.raises(ValueError, match="shape"):
        scale_exact(torch.zeros(4, dtype=torch.int64), Fraction(9, 10), buffer)
    with pytest.raises(ValueError, match="int64"):
        scale_exact(q.float(), Fraction(9, 10), buffer)
    with pytest.raises(ValueError, match="numerator"):
        scale_exact(q, Fraction(1, MAX_DENOMINATOR + 1), buffer)
    with pytest.raises(TypeError, match="Fraction"):
        scale_exact(q, 0.9, buffer)  # type: ignore[arg-type]


# --- InformationBuffer ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=seeds,
    shape=shapes,
    pushes=st.lists(bases, min_size=1, max_size=25),
    zero_fraction=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_pop_inverts_push(
    seed: int, shape: tuple[int, ...], pushes: list[int], zero_fraction: float
) -> None:
    generator = torch.Generator().manual_seed(seed)
    buffer = InformationBuffer.empty(torch.empty(shape))
    history = []
    for base in pushes:
        values = torch.randint(0, base, shape, generator=generator)
        # zeros on some elements keep their heads small, so spills cover only part of the elements
        values = values * (torch.rand(shape, generator=generator) >= zero_fraction)
        history.append((values, buffer_state(buffer), buffer.bits()))
        buffer = buffer.push(values, base)
        assert bool(((buffer.head >= 0) & (buffer.head < 2**47)).all())
    for base, (values, state, bits) in zip(reversed(pushes), reversed(history)):
        buffer, popped = buffer.pop(base)
        assert torch.equal(popped, values)
        assert_same_state(buffer, state)
        assert buffer.bits() == bits
    assert_empty(buffer)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, shape=shapes, draws=st.lists(bases, min_size=1, max_size=12))
def test_undraw_inverts_draw(seed: int, shape: tuple[int, ...], draws: list[int]) -> None:
    generator = torch.Generator().manual_seed(seed)
    buffer = InformationBuffer.empty(torch.empty(shape))
    for _ in range(4):  # some content, spilled words included
        buffer = buffer.push(torch.randint(0, 2**16, shape, generator=generator), 2**16)
    history = []
    for base in draws:
        state = buffer_state(buffer)
        buffer, values = buffer.draw(base)
        assert bool(((values >= 0) & (values < base)).all())
        assert buffer.top is state[1]  # draw never touches the stack
        history.append((base, values, state))
    for base, values, state in reversed(history):
        buffer = buffer.undraw(values, base)
        assert_same_state(buffer, state)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes, base=bases)
def test_draw_inverts_undraw(seed: int, shape: tuple[int, ...], base: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    head = torch.randint(0, 2**30, shape, generator=generator)
    buffer = InformationBuffer(head)
    values = torch.randint(0, base, shape, generator=generator)
    out, drawn = buffer.undraw(values, base).draw(base)
    assert torch.equal(drawn, values) and torch.equal(out.head, head)


def test_draw_from_an_empty_head_gives_zeros() -> None:
    buffer = InformationBuffer(torch.tensor([0, 3, 10]))
    out, values = buffer.draw(5)
    assert values.tolist() == [0, 3, 0] and out.head.tolist() == [0, 0, 2]


@pytest.mark.parametrize("every", [1, 3])
def test_spill_entries_with_and_without_mask(every: int) -> None:
    values = torch.full((13,), 2**16 - 1) * (torch.arange(13) % every == 0)  # zeros keep heads at 0
    buffer = InformationBuffer.empty(values)
    states = []
    for _ in range(7):
        states.append(buffer_state(buffer))
        buffer = buffer.push(values, 2**16)
    masks = []
    entry = buffer.top
    while entry is not None:
        masks.append(entry.mask)
        entry = entry.parent
    assert len(masks) == 3  # pushes 3, 5 and 7 take a head past 2^47
    if every == 1:
        assert all(mask is None for mask in masks)  # every element spilled
    else:
        expected = packbits(values > 0)
        assert all(mask is not None and torch.equal(mask, expected) for mask in masks)
    for state in reversed(states):
        buffer, popped = buffer.pop(2**16)
        assert torch.equal(popped, values)
        assert_same_state(buffer, state)


def test_bits_are_exact_bit_lengths() -> None:
    heads = [0, 1, 2, 3, 2**32 - 1, 2**32, 2**46, 2**47 - 1]
    buffer = InformationBuffer(torch.tensor(heads))
    assert buffer.bits() == sum(h.bit_length() for h in heads)
    assert buffer.numel == len(heads)
    pushed = buffer.push(torch.zeros(len(heads), dtype=torch.int64), 2)  # 2^47 - 1 → spill
    assert pushed.top is not None
    assert pushed.bits() == buffer.bits() + sum(1 for h in heads if h) + pushed.top.mask.numel() * 8


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes)
def test_packbits_round_trip(seed: int, shape: tuple[int, ...]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < 0.5
    packed = packbits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(mask.numel() / 8)
    assert torch.equal(unpackbits(packed, mask.shape), mask)


def test_buffer_rejects_invalid_use() -> None:
    buffer = InformationBuffer.empty(torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        buffer.push(torch.tensor([0, 1, 2, 10]), 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        buffer.push(torch.tensor([0, -1, 2, 3]), 10)
    with pytest.raises(ValueError, match="base"):
        buffer.push(torch.zeros(4, dtype=torch.int64), MAX_DENOMINATOR + 1)
    with pytest.raises(ValueError, match="base"):
        buffer.draw(0)
    with pytest.raises(ValueError, match="shape"):
        buffer.push(torch.zeros(5, dtype=torch.int64), 10)
    with pytest.raises(ValueError, match="no push"):
        buffer.pop(10)
    big = InformationBuffer(torch.full((4,), 2**46))
    with pytest.raises(OverflowError, match="2\\^47"):
        big.undraw(torch.zeros(4, dtype=torch.int64), 2)


# --- exact_ratio -------------------------------------------------------------------------------------


def test_exact_ratio_takes_decimal_floats_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert exact_ratio(0.9) == Fraction(9, 10)
        assert exact_ratio(-0.9) == Fraction(-9, 10)
        assert exact_ratio(2.5) == Fraction(5, 2)
        assert exact_ratio(torch.tensor(0.5)) == Fraction(1, 2)
        assert exact_ratio(3) == Fraction(3)
        third = Fraction(1, 3)
        assert exact_ratio(third) == third


def test_exact_ratio_warns_when_it_changes_the_value() -> None:
    with pytest.warns(RuntimeWarning, match=r"gamma = 0\.123456789123 .* using") as record:
        ratio = exact_ratio(0.123456789123, name="gamma")
    assert ratio.denominator <= MAX_DENOMINATOR
    assert str(ratio) in str(record[0].message)
    assert abs(float(ratio) - 0.123456789123) < 1 / MAX_DENOMINATOR**1.5
    assert f"{float(ratio - Fraction(0.123456789123)):.3e}" in str(record[0].message)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "not invertible"),
        (0.0, "not invertible"),
        (Fraction(0), "not invertible"),
        (1e-7, "not invertible"),
        (float("nan"), "finite"),
        (float("inf"), "finite"),
        (Fraction(1, MAX_DENOMINATOR + 1), "denominator"),
        (1e6, "numerator"),
        (torch.ones(2), "single number"),
    ],
)
def test_exact_ratio_rejects(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        exact_ratio(value)  # type: ignore[arg-type]


# --- quantize / dequantize / check_range ------------------------------------------------------------


def test_quantize_rejects_non_finite_values() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(FloatingPointError, match="velocity"):
            quantize(torch.tensor([0.0, bad]), 32, what="velocity")


def test_quantize_rejects_values_out_of_range() -> None:
    limit = SAFE_LIMIT / 2**32
    quantize(torch.tensor([limit, -limit], dtype=torch.float64), 32)
    with pytest.raises(OverflowError, match=r"state: magnitude 10000000000\.0 .*±16384\.0"):
        quantize(torch.tensor([1.0, -1e10]), 32, what="state")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dequantize_inverts_quantize_on_the_grid(dtype: torch.dtype) -> None:
    q = randint(5, -(2**40), 2**40, (100,))
    if dtype != torch.float64:  # few enough significant bits to be exact in dtype
        q = q // 2**32 * 2**24
    x = dequantize(q, 32, dtype)
    assert x.dtype == dtype
    assert torch.equal(quantize(x, 32), q)
    assert torch.equal(dequantize(quantize(x, 32), 32, dtype), x)


def test_quantize_rounds_half_to_even() -> None:
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, 0.25])
    assert quantize(x, 0).tolist() == [0, 2, 2, 0, -2, 0]
    assert quantize(x, 1).tolist() == [1, 3, 5, -1, -3, 0]


def test_check_range() -> None:
    check_range(torch.tensor([SAFE_LIMIT, -SAFE_LIMIT]), what="ok")
    check_range(torch.zeros(0, dtype=torch.int64), what="empty")
    for bad in (SAFE_LIMIT + 1, -SAFE_LIMIT - 1, -(2**63)):
        with pytest.raises(OverflowError, match=f"velocity: fixed-point magnitude {abs(bad)}"):
            check_range(torch.tensor([0, bad]), what="velocity")


# --- the fused kernels of scale_add_exact / unscale_sub_exact --------------------------------------

needs_kernels = pytest.mark.skipif(kernels.cpu_kernels() is None,
                                   reason=NO_KERNELS)


def separately(function, *args, **kwargs):
    """``function(*args, **kwargs)`` with the fused kernels unavailable: the separate torch operations."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "cpu_kernels", lambda: None)
        return outcome(function, *args, **kwargs)


def outcome(function, *args, **kwargs):
    """The result, or the type and message of the error raised."""
    try:
        return function(*args, **kwargs)
    except (OverflowError, FloatingPointError) as error:
        return type(error), str(error)


def assert_same_outcome(fused, plain) -> None:
    assert type(fused) is type(plain)
    if isinstance(fused[0], type):  # an error
        assert fused == plain
        return
    (q, buffer), (q_plain, buffer_plain) = fused, plain
    assert torch.equal(q, q_plain) and torch.equal(buffer.head, buffer_plain.head)
    assert buffer.depth == buffer_plain.depth and buffer.bits() == buffer_plain.bits()


@st.composite
def kernel_operands(draw: st.DrawFn):
    """Contractions the kernel takes (and some it leaves to the separate operations), states anywhere in
    ``±2^46``, heads anywhere below ``2^47``, increments in and beyond range, NaN and infinity."""
    d = draw(st.one_of(st.integers(2, 63), st.integers(64, MAX_DENOMINATOR)))
    ratio = Fraction(draw(st.integers(1, d - 1)) * draw(st.sampled_from([1, -1])), d)
    seed, shape = draw(seeds), draw(st.lists(st.integers(1, 40), min_size=1, max_size=2).map(tuple))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    frac_bits = draw(st.sampled_from([0, 16, 32, 40]))
    bound = draw(st.sampled_from([2**20, 2**46]))
    q = randint(seed, -bound, bound + 1, shape)
    head = randint(seed + 1, 0, draw(st.sampled_from([2, 2**20, 2**47])), shape)
    scale = draw(st.sampled_from([1.0, 1.0, 2.0**10, 2.0 ** (44 - frac_bits), 2.0 ** (47 - frac_bits)]))
    increment = (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale)
    special = draw(st.sampled_from([None] * 5 + [math.nan, -math.inf, 2.0 ** (46 - frac_bits)]))
    if special is not None:
        increment.view(-1)[0] = special
    return q, ratio, InformationBuffer(head, None, draw(st.integers(0, 3))), increment.to(dtype), frac_bits


@needs_kernels
@settings(max_examples=300, deadline=None)
@given(operands=kernel_operands(), gain=st.sampled_from([1.0, 0.1, -0.5]))
def test_fused_kernels_give_the_bits_and_errors_of_the_separate_operations(operands, gain: float) -> None:
    q, ratio, buffer, increment, frac_bits = operands
    options = {"gain": gain, "what": "u"}
    fused = outcome(scale_add_exact, q, ratio, buffer, increment, frac_bits, result="q'", **options)
    assert_same_outcome(fused, separately(scale_add_exact, q, ratio, buffer, increment, frac_bits,
                                          result="q'", **options))
    # the inverse, from the result (if any) and from an arbitrary state (its errors)
    for start, after in ([fused] if not isinstance(fused[0], type) else []) + [(q, buffer._pushed(buffer.head, 0))]:
        undone = outcome(unscale_sub_exact, start, ratio, after, increment, frac_bits, **options)
        assert_same_outcome(undone, separately(unscale_sub_exact, start, ratio, after, increment,
                                               frac_bits, **options))
        if start is fused[0]:
            restored, back = undone
            assert torch.equal(restored, q) and torch.equal(back.head, buffer.head) and back.depth == buffer.depth


@needs_kernels
def test_fused_kernels_spill_and_unspill_as_the_buffer_does() -> None:
    """Heads near 2^47 spill after the kernel's push; the pop that must unspill runs separately."""
    q = randint(0, -(2**40), 2**40, (64,))
    buffer = InformationBuffer(randint(1, 2**46, 2**47, (64,)), None, 0)
    increment = torch.randn(64)
    new, pushed = scale_add_exact(q, Fraction(9, 10), buffer, increment, 32, gain=0.1)
    assert pushed.top is not None and pushed.top.push_index == 1
    assert_same_outcome((new, pushed), separately(scale_add_exact, q, Fraction(9, 10), buffer,
                                                  increment, 32, gain=0.1))
    restored, back = unscale_sub_exact(new, Fraction(9, 10), pushed, increment, 32, gain=0.1)
    assert torch.equal(restored, q) and torch.equal(back.head, buffer.head) and back.top is None


def bits(x: torch.Tensor) -> torch.Tensor:
    """The bit patterns of a float32 or float64 tensor (so that -0.0 and 0.0 differ)."""
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int64)


def wide_integers(seed: int, shape: tuple[int, ...], bound: int) -> torch.Tensor:
    """int64 in ``[-bound, bound]``, with the extremes, small values and zero among them."""
    q = randint(seed, -bound, bound, shape).view(-1)
    specials = torch.tensor([bound, -bound, 0, 1, -1, 3, -(2**63) if bound == 2**63 - 1 else -bound])
    q[: specials.numel()] = specials[: q.numel()]
    return q.view(shape)


frac_bits_anywhere = st.sampled_from([0, 16, 32, 60, 100, 140, 160, 1100])  # 2^-F underflows float32 beyond 149


@needs_kernels
@settings(max_examples=200, deadline=None)
@given(seed=seeds, shape=st.lists(st.integers(1, 40), min_size=0, max_size=2).map(tuple),
       bound=st.sampled_from([2**20, 2**46, 2**53, 2**63 - 1]), frac_bits=frac_bits_anywhere,
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_dequantize_kernel_gives_the_bits_of_the_separate_operations(seed, shape, bound, frac_bits, dtype) -> None:
    q = wide_integers(seed, shape, bound) if shape != () else torch.tensor(bound)
    assert kernels.integer_kernel("view", dtype, q) is not None
    fused = dequantize(q, frac_bits, dtype)
    plain = separately(dequantize, q, frac_bits, dtype)
    assert fused.dtype == plain.dtype == dtype and fused.shape == q.shape
    assert torch.equal(bits(fused), bits(plain))


@needs_kernels
@settings(max_examples=300, deadline=None)
@given(seed=seeds, shape=st.lists(st.integers(1, 40), min_size=1, max_size=2).map(tuple),
       bound=st.sampled_from([2**20, 2**45, 2**46, 2**63 - 1]), frac_bits=frac_bits_anywhere,
       dtype=st.sampled_from([torch.float32, torch.float64]), subtract=st.booleans(),
       checked=st.booleans())
def test_add_kernel_gives_the_bits_and_errors_of_the_separate_operations(
    seed, shape, bound, frac_bits, dtype, subtract: bool, checked: bool
) -> None:
    """In range, beyond ``±2^46`` (an error only if checked) and wrapping past ``±2^63`` as torch does."""
    q, increment = wide_integers(seed, shape, bound), wide_integers(seed + 1, shape, bound)
    options = {"subtract": subtract, "what": "x'" if checked else None}
    fused = outcome(add_exact, q, increment, frac_bits, dtype, **options)
    plain = separately(add_exact, q, increment, frac_bits, dtype, **options)
    if isinstance(plain[0], type):
        assert fused == plain
        return
    (new, view), (plain_new, plain_view) = fused, plain
    assert plain_view is None and torch.equal(new, plain_new)
    assert torch.equal(new, q - increment if subtract else q + increment)
    assert torch.equal(bits(view), bits(separately(dequantize, plain_new, frac_bits, dtype)))


def test_add_exact_leaves_what_the_kernel_cannot_take_to_torch() -> None:
    """bfloat16 views, empty and non-contiguous tensors: the torch operation, no view; still range-checked."""
    q = torch.arange(12, dtype=torch.int64).view(3, 4)
    for a, b, dtype in ((q, q, torch.bfloat16), (q[:0], q[:0], torch.float32), (q.t(), q.t(), torch.float32)):
        new, view = add_exact(a, b, 32, dtype, what="x'")
        assert view is None and torch.equal(new, a + b)
    with pytest.raises(OverflowError, match="x': fixed-point magnitude"):
        add_exact(q.t() * SAFE_LIMIT, q.t(), 32, torch.float32, what="x'")
