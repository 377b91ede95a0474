"""Tests of revnets.autograd.kernels: exact mode's fused CPU operators (torch.ops.revnets.exact_*), built with
torch.utils.cpp_extension: their schemas and fake kernels (torch.library.opcheck), the bits of the separate
torch operations at odd sizes, float32 and float64, one and two threads, what falls back to those operations,
and the build (named by source and processor, in torch's extension cache, warned about once when impossible)."""

import functools
import math
import os
import warnings
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from revnets.autograd import kernels
from revnets.autograd.exact import InformationBuffer, add_exact, dequantize, scale_add_exact, unscale_sub_exact

needs_kernels = pytest.mark.skipif(kernels.cpu_kernels() is None,
                                   reason="no C++ compiler or ninja: only the separate operations run")
dtypes = pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
ODD_SHAPES = [(1,), (7,), (3, 5), (33, 17), (2 * 16384 + 7,)]  # the last one is split over threads
"""Odd sizes: not a multiple of any vector width; the largest spans several parallel tasks."""


def operands(shape, dtype, seed=0, bound=2**46):
    """Fixed-point ``q`` in ``±bound``, heads below ``2^47``, an increment of ``dtype`` with a large entry."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-bound, bound + 1, shape, generator=g)
    head = torch.randint(0, 2**47, shape, generator=g)
    increment = (torch.randn(shape, generator=g, dtype=torch.float64) * 2.0**10).to(dtype)
    increment.view(-1)[0] = 2.0**13  # ·2^32: 2^45, in range
    return q, head, increment


def separately(function, *args, **kwargs):
    """``function(*args, **kwargs)`` without the fused operators: the separate torch operations."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "cpu_kernels", lambda: None)
        return function(*args, **kwargs)


def with_threads(count: int, function, *args, **kwargs):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return function(*args, **kwargs)
    finally:
        torch.set_num_threads(before)


def assert_same(fused, plain) -> None:
    (q, buffer), (q_plain, buffer_plain) = fused, plain
    assert torch.equal(q, q_plain) and torch.equal(buffer.head, buffer_plain.head)
    assert buffer.depth == buffer_plain.depth and buffer.bits() == buffer_plain.bits()


def bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(torch.int32 if x.dtype == torch.float32 else torch.int64)


# --- the operators: schemas and fake kernels -------------------------------------------------------

@needs_kernels
@dtypes
@pytest.mark.parametrize("shape", [(7,), (3, 5)])
def test_operators_pass_opcheck(dtype, shape) -> None:
    """Schema, fake (meta) kernel, dispatch under AOT autograd with dynamic shapes: torch.library.opcheck."""
    ops = torch.ops.revnets
    q, head, increment = operands(shape, dtype, bound=2**40)
    samples = [
        (ops.exact_scale_add.default, (q, head, increment, 0.1 * 2.0**32, 9, 10)),
        (ops.exact_scale_add.default, (q, head, increment, -0.5 * 2.0**16, -31, 63)),
        (ops.exact_unscale_sub.default, (q, head, increment, 0.1 * 2.0**32, 9, 10)),
        (ops.exact_add.default, (q, head, 2.0**-32, False, dtype)),
        (ops.exact_add.default, (q, head, 2.0**-32, True, dtype)),
        (ops.exact_view.default, (q, 2.0**-32, dtype)),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@needs_kernels
def test_operators_reject_what_they_do_not_take() -> None:
    """The Python side never sends these; the operators refuse them rather than read memory wrongly."""
    ops = torch.ops.revnets
    q, head, increment = operands((4, 6), torch.float32)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.exact_scale_add(q.t(), head.t(), increment.t(), 1.0, 9, 10)
    with pytest.raises(RuntimeError, match="ratio 9/64"):
        ops.exact_scale_add(q, head, increment, 1.0, 9, 64)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.exact_unscale_sub(q, head, increment.half(), 1.0, 9, 10)
    with pytest.raises(RuntimeError, match="shapes"):
        ops.exact_add(q, head[:2], 1.0, False, torch.float32)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.exact_view(q, 1.0, torch.bfloat16)


# --- the bits of the separate operations -------------------------------------------------------------

@needs_kernels
@dtypes
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ratio", [Fraction(9, 10), Fraction(-1, 2), Fraction(62, 63)])
def test_fused_scale_and_unscale_give_the_bits_of_the_separate_operations(dtype, shape, threads, ratio) -> None:
    q, head, increment = operands(shape, dtype, bound=2**44)
    buffer = InformationBuffer(head, None, 2)
    assert kernels.fused_kernel("apply", q, head, increment, ratio.numerator, ratio.denominator) is not None
    fused = with_threads(threads, scale_add_exact, q, ratio, buffer, increment, 32, gain=0.1)
    assert_same(fused, separately(scale_add_exact, q, ratio, buffer, increment, 32, gain=0.1))
    new, pushed = fused
    undone = with_threads(threads, unscale_sub_exact, new, ratio, pushed, increment, 32, gain=0.1)
    assert_same(undone, separately(unscale_sub_exact, new, ratio, pushed, increment, 32, gain=0.1))
    assert torch.equal(undone[0], q) and torch.equal(undone[1].head, head)


@needs_kernels
@dtypes
@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_add_and_view_give_the_bits_of_the_separate_operations(dtype, shape, threads) -> None:
    (q, *_), (other, *_) = (operands(shape, dtype, seed=seed, bound=2**45) for seed in (1, 2))
    for subtract in (False, True):
        new, view = with_threads(threads, add_exact, q, other, 32, dtype, subtract=subtract, what="x'")
        plain, none = separately(add_exact, q, other, 32, dtype, subtract=subtract, what="x'")
        assert none is None and torch.equal(new, plain)
        assert torch.equal(bits(view), bits(separately(dequantize, plain, 32, dtype)))
    fused = with_threads(threads, dequantize, q, 40, dtype)
    assert torch.equal(bits(fused), bits(separately(dequantize, q, 40, dtype)))


@needs_kernels
@pytest.mark.parametrize("threads", [1, 2])
def test_errors_found_in_any_parallel_task_raise_as_the_separate_operations_do(threads) -> None:
    """A NaN, an increment beyond 2^46 or a sum beyond 2^46 in the last element of a large state: the
    reduction over the threads' tasks sees it, and the separate operations then raise their error."""
    q, head, increment = operands(ODD_SHAPES[-1], torch.float64, bound=2**40)
    buffer = InformationBuffer(head, None, 0)
    for last_increment, last_q in ((math.nan, 0), (2.0**15, 0), (2.0**13, 2**46 - 10)):  # NaN, 2^47, sum > 2^46
        broken, q_broken = increment.clone(), q.clone()
        broken[-1], q_broken[-1] = last_increment, last_q
        with pytest.raises((FloatingPointError, OverflowError)) as fused:
            with_threads(threads, scale_add_exact, q_broken, Fraction(62, 63), buffer, broken, 32)
        with pytest.raises(fused.type) as plain:
            separately(scale_add_exact, q_broken, Fraction(62, 63), buffer, broken, 32)
        assert str(fused.value) == str(plain.value)


# --- what the operators leave to the separate operations ---------------------------------------------

@needs_kernels
@dtypes
def test_non_contiguous_operands_run_as_separate_operations(dtype) -> None:
    """Transposed tensors (any of the operands): no operator, the separate operations, the same bits as on
    contiguous copies (where the operator runs)."""
    q, head, increment = operands((6, 9), dtype, bound=2**40)
    ratio = Fraction(9, 10)
    for which in range(3):
        args = [q, head, increment]
        args[which] = args[which].t().contiguous().t()  # same values, transposed strides
        assert kernels.fused_kernel("apply", args[0], args[1], args[2], 9, 10) is None
        fused = scale_add_exact(args[0], ratio, InformationBuffer(args[1], None, 1), args[2], 32, gain=0.1)
        assert_same(fused, scale_add_exact(q, ratio, InformationBuffer(head, None, 1), increment, 32, gain=0.1))
    transposed = q.t()
    assert kernels.integer_kernel("view", dtype, transposed) is None
    assert torch.equal(bits(dequantize(transposed, 32, dtype)), bits(dequantize(q, 32, dtype).t()))
    new, view = add_exact(transposed, transposed, 32, dtype)
    assert view is None and torch.equal(new, 2 * transposed)


def test_other_devices_dtypes_and_ratios_take_no_operator() -> None:
    """Not CPU, empty, bfloat16, denominators above 63: None, without building anything."""
    q, head, increment = operands((3, 4), torch.float32)
    meta = [t.to("meta") for t in (q, head, increment)]
    assert kernels.fused_kernel("apply", *meta, 9, 10) is None
    assert kernels.fused_kernel("apply", q[:0], head[:0], increment[:0], 9, 10) is None
    assert kernels.fused_kernel("undo", q, head, increment.bfloat16(), 9, 10) is None
    assert kernels.fused_kernel("undo", q, head, increment, 63, 64) is None
    assert kernels.integer_kernel("view", torch.float32, meta[0]) is None
    assert kernels.integer_kernel("add", torch.bfloat16, q, q) is None


# --- the build -----------------------------------------------------------------------------------------

@needs_kernels
def test_the_build_lands_once_in_torchs_extension_cache() -> None:
    """Loaded once per process; named by the source and the processor, in $TORCH_EXTENSIONS_DIR or
    torch's default extension folder."""
    assert kernels.cpu_kernels() is kernels.cpu_kernels() is torch.ops.revnets
    assert kernels.cpu_kernels.cache_info().currsize == 1
    name = kernels.extension_name(os.environ.get("CXX", "c++"))
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
    assert any(root.glob(f"*/{name}*/{name}*.so")) or any(root.glob(f"{name}*/{name}*.so"))


def test_the_build_name_changes_with_the_processor_the_source_and_the_compiler(monkeypatch, tmp_path) -> None:
    name = kernels.extension_name("c++")
    assert name.startswith("revnets_exact_") and name == kernels.extension_name("c++")
    assert kernels.extension_name("clang++") != name
    monkeypatch.setattr(kernels, "cpu_identity", lambda: "model name : another processor")
    assert kernels.extension_name("c++") != name
    monkeypatch.undo()
    edited = tmp_path / "exact_kernels.cpp"
    edited.write_text(kernels.KERNEL_SOURCE_PATH.read_text() + "// edited\n")
    monkeypatch.setattr(kernels, "KERNEL_SOURCE_PATH", edited)
    assert kernels.extension_name("c++") != name


def test_no_compiler_warns_once_and_the_separate_operations_run(monkeypatch) -> None:
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    once = functools.cache(kernels.cpu_kernels.__wrapped__)
    monkeypatch.setattr(kernels, "cpu_kernels", once)
    q, head, increment = operands((5,), torch.float32, bound=2**40)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert kernels.fused_kernel("apply", q, head, increment, 9, 10) is None
            scale_add_exact(q, Fraction(9, 10), InformationBuffer(head, None, 0), increment, 32)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "no C++ compiler" in messages[0] and "/nonexistent/c++" in messages[0]
    assert "separate torch operations" in messages[0]


def test_ninja_of_this_environment_is_found_without_activating_it(monkeypatch, tmp_path) -> None:
    """The ``ninja`` package puts ninja in this environment's scripts folder, on PATH only once activated."""
    import sysconfig

    monkeypatch.setenv("PATH", str(tmp_path))  # no ninja there
    with kernels._ninja_on_path():
        assert os.environ["PATH"].split(os.pathsep) == [str(tmp_path), sysconfig.get_path("scripts")]
    assert os.environ["PATH"] == str(tmp_path)


def test_a_failed_build_is_reported_by_its_compiler_error() -> None:
    error = RuntimeError("Error building extension 'revnets_exact_0': [1/2] c++ -MMD -O3 ...\n"
                         "In file included from x.h:1,\nexact_kernels.cpp:22:23: error: expected initializer\n")
    assert kernels._cause(error) == ("Error building extension 'revnets_exact_0': "
                                     "exact_kernels.cpp:22:23: error: expected initializer")
    assert kernels._cause(OSError()) == "OSError"
