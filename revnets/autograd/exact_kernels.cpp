// revnets: fused CPU kernels of exact (fixed-point) mode as torch.library operators (namespace revnets),
// built by revnets/autograd/kernels.py with torch.utils.cpp_extension and split over threads with
// at::parallel_for. Each is one pass over memory of the integer arithmetic that revnets/autograd/exact.py
// also writes as separate torch operations, with the same bits (tests/test_exact_kernels.py compares both).
// The arithmetic is float64 on integers below 2^52, hence exact; element i depends on element i only, so
// the split over threads changes no bit.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <tuple>

namespace {

using i64 = int64_t;
using Tensors = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
constexpr double SAFE = 70368744177664.0;      // 2^46
constexpr double MAGIC = 6755399441055744.0;   // 1.5 · 2^52: its ulp is 1
constexpr i64 MAGIC_BITS = 0x4338000000000000LL;  // the bits of MAGIC
constexpr i64 GRAIN = 16384;                   // elements per task of at::parallel_for / parallel_reduce

// Exact conversions of integers |x| < 2^51: x sits in the mantissa of MAGIC + x.
inline double to_f64(i64 x) { i64 b = x + MAGIC_BITS; double r; std::memcpy(&r, &b, 8); return r - MAGIC; }
inline i64 to_i64(double x) { double y = x + MAGIC; i64 b; std::memcpy(&b, &y, 8); return b - MAGIC_BITS; }
// x rounded to an integer, half to even (the default rounding mode), |x| < 2^51.
inline double round_even(double x) { return (x + MAGIC) - MAGIC; }
// floor(a / d) of integers |a| < 2^52, 1 <= d < 2^6, inv = fl(1/d), |a/d| < 2^50: a·inv is within 1/4 of
// a/d, so its nearest integer is floor(a/d) or one more; the remainder's sign tells which (exact products).
inline double floor_div(double a, double d, double inv) {
    double q = round_even(a * inv);
    return a - q * d < 0 ? q - 1 : q;
}

// Extremes reduced over the elements: bad (or), then (min, max) pairs, all starting at 0.
struct Stats { i64 bad = 0, lo = 0, hi = 0, lo2 = 0, hi2 = 0; };
inline Stats merge(const Stats& a, const Stats& b) {
    return {a.bad | b.bad, std::min(a.lo, b.lo), std::max(a.hi, b.hi), std::min(a.lo2, b.lo2), std::max(a.hi2, b.hi2)};
}

void check(const at::Tensor& q, const at::Tensor& other, const char* what) {
    TORCH_CHECK(q.device().is_cpu() && other.device().is_cpu(), what, ": CPU tensors only");
    TORCH_CHECK(q.scalar_type() == at::kLong, what, ": q must be int64");
    TORCH_CHECK(q.sizes() == other.sizes(), what, ": operands of different shapes");
    TORCH_CHECK(q.is_contiguous() && other.is_contiguous(), what, ": contiguous tensors only");
}

void check_fused(const at::Tensor& q, const at::Tensor& head, const at::Tensor& inc, i64 n, i64 d, const char* what) {
    check(q, head, what);
    check(q, inc, what);
    TORCH_CHECK(head.scalar_type() == at::kLong, what, ": the head must be int64");
    TORCH_CHECK(inc.scalar_type() == at::kFloat || inc.scalar_type() == at::kDouble, what,
                ": the increment must be float32 or float64");
    i64 m = n < 0 ? -n : n;  // every intermediate an integer below 2^52 (revnets.autograd.kernels.kernel_ratio)
    TORCH_CHECK(0 < m && m < d && d <= 63 && ((i64(1) << 47) / m + 1) * d <= (i64(1) << 51), what,
                ": the ratio ", n, "/", d, " is not one the kernel takes");
}

// The int64 CPU tensor of these values.
at::Tensor stats_tensor(std::initializer_list<i64> values) {
    at::Tensor out = at::empty({i64(values.size())}, at::TensorOptions().dtype(at::kLong));
    std::copy(values.begin(), values.end(), out.data_ptr<i64>());
    return out;
}

// new = floor((old·sn + (h mod n)) / d) + round(fl(inc·factor)), h -> floor(h/n)·d + (that numerator mod d),
// n = |sn|. Stats: bad = 1 if some |fl(inc·factor)| > 2^46 or NaN, lo/hi = min/max of new, hi2 = max head.
template <typename T>
Stats apply_range(i64 begin, i64 end, const i64* old, const i64* head, const T* inc, T f, double sn, double d,
                  i64* out, i64* head_out) {
    const double n = sn < 0 ? -sn : sn, inv_n = 1.0 / n, inv_d = 1.0 / d;
    i64 bad = 0, lo = 0, hi = 0, top = 0;
    for (i64 i = begin; i < end; i++) {
        double s = (double)(inc[i] * f), m = s < 0 ? -s : s;
        i64 ok = m <= SAFE; bad |= ok ^ 1; double qi = round_even(ok ? s : 0);  // NaN: not ok
        double h = to_f64(head[i]), hq = floor_div(h, n, inv_n);
        double a = to_f64(old[i]) * sn + (h - hq * n), q = floor_div(a, d, inv_d);
        double h2 = hq * d + (a - q * d), v = q + qi;
        i64 vi = to_i64(v), hi_ = to_i64(h2); out[i] = vi; head_out[i] = hi_;
        lo = vi < lo ? vi : lo; hi = vi > hi ? vi : hi; top = hi_ > top ? hi_ : top;
    }
    return {bad, lo, hi, 0, top};
}

// a = (new - round(fl(inc·factor)))·d + (h mod d), old = sign(sn)·floor(a / n), h -> floor(h/d)·n + (a mod n).
// Stats: bad as above, lo/hi = min/max of new - round(fl(inc·factor)), lo2/hi2 = min/max of floor(a / n).
template <typename T>
Stats undo_range(i64 begin, i64 end, const i64* new_, const i64* head, const T* inc, T f, double sn, double d,
                 i64* out, i64* head_out) {
    const double n = sn < 0 ? -sn : sn, inv_n = 1.0 / n, inv_d = 1.0 / d, sign = sn < 0 ? -1.0 : 1.0;
    i64 bad = 0, lo = 0, hi = 0, lo2 = 0, hi2 = 0;
    for (i64 i = begin; i < end; i++) {
        double s = (double)(inc[i] * f), m = s < 0 ? -s : s;
        i64 ok = m <= SAFE; bad |= ok ^ 1; double qi = round_even(ok ? s : 0);  // NaN: not ok
        double o = to_f64(new_[i]) - qi;
        double c = o > SAFE ? SAFE : o < -SAFE ? -SAFE : o;  // o itself is range-checked
        double h = to_f64(head[i]), hq = floor_div(h, d, inv_d);
        double a = c * d + (h - hq * d), q = floor_div(a, n, inv_n);
        out[i] = to_i64(sign * q); head_out[i] = to_i64(hq * n + (a - q * n));
        i64 oi = to_i64(c == o ? o : c + c), qq = to_i64(q);  // beyond 2^46: twice the clamp, still beyond
        lo = oi < lo ? oi : lo; hi = oi > hi ? oi : hi; lo2 = qq < lo2 ? qq : lo2; hi2 = qq > hi2 ? qq : hi2;
    }
    return {bad, lo, hi, lo2, hi2};
}

// One fused pass (apply_range or undo_range) over every element, split over threads; stats of `count`.
template <bool UNDO>
Tensors fused(const at::Tensor& q, const at::Tensor& head, const at::Tensor& inc, double factor, i64 n, i64 d) {
    check_fused(q, head, inc, n, d, UNDO ? "revnets::exact_unscale_sub" : "revnets::exact_scale_add");
    at::Tensor out = at::empty(q.sizes(), q.options()), head_out = at::empty(q.sizes(), q.options());
    const i64 *src = q.data_ptr<i64>(), *h = head.data_ptr<i64>();
    i64 *dst = out.data_ptr<i64>(), *h2 = head_out.data_ptr<i64>();
    const double sn = double(n), dd = double(d);
    auto run = [&](auto* x, auto f) {
        return at::parallel_reduce(0, q.numel(), GRAIN, Stats{}, [&](i64 b, i64 e, Stats) {
            if constexpr (UNDO) return undo_range(b, e, src, h, x, f, sn, dd, dst, h2);
            else return apply_range(b, e, src, h, x, f, sn, dd, dst, h2);
        }, merge);
    };
    Stats s = inc.scalar_type() == at::kFloat ? run(inc.data_ptr<float>(), float(factor))
                                              : run(inc.data_ptr<double>(), factor);
    return {out, head_out, UNDO ? stats_tensor({s.bad, s.lo, s.hi, s.lo2, s.hi2}) : stats_tensor({s.bad, s.lo, s.hi, s.hi2})};
}

// new = old ± inc (wrapping, as torch's int64 arithmetic), view = (T)new · (T)scale: new rounded once to T,
// times the power of two scale in T (dequantize's two steps). Stats: lo/hi = min/max of new.
template <typename T>
Stats combine_range(i64 begin, i64 end, const i64* old, const i64* inc, T s, bool subtract, i64* out, T* view) {
    i64 lo = 0, hi = 0;
    if (subtract) {
        for (i64 i = begin; i < end; i++) {
            i64 v = (i64)((uint64_t)old[i] - (uint64_t)inc[i]); out[i] = v; view[i] = (T)v * s;
            lo = v < lo ? v : lo; hi = v > hi ? v : hi;
        }
    } else {
        for (i64 i = begin; i < end; i++) {
            i64 v = (i64)((uint64_t)old[i] + (uint64_t)inc[i]); out[i] = v; view[i] = (T)v * s;
            lo = v < lo ? v : lo; hi = v > hi ? v : hi;
        }
    }
    return {0, lo, hi, 0, 0};
}

Tensors add_view(const at::Tensor& q, const at::Tensor& inc, double scale, bool subtract, at::ScalarType dtype) {
    check(q, inc, "revnets::exact_add");
    TORCH_CHECK(inc.scalar_type() == at::kLong, "revnets::exact_add: the increment must be int64");
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "revnets::exact_add: float32 or float64 views only");
    at::Tensor out = at::empty(q.sizes(), q.options()), view = at::empty(q.sizes(), q.options().dtype(dtype));
    const i64 *a = q.data_ptr<i64>(), *b = inc.data_ptr<i64>();
    i64* dst = out.data_ptr<i64>();
    auto run = [&](auto* v, auto s) {
        return at::parallel_reduce(0, q.numel(), GRAIN, Stats{}, [&](i64 lo, i64 hi, Stats) {
            return combine_range(lo, hi, a, b, s, subtract, dst, v);
        }, merge);
    };
    Stats s = dtype == at::kFloat ? run(view.data_ptr<float>(), float(scale)) : run(view.data_ptr<double>(), scale);
    return {out, view, stats_tensor({s.lo, s.hi})};
}

// view = (T)q · (T)scale, as above.
at::Tensor view(const at::Tensor& q, double scale, at::ScalarType dtype) {
    check(q, q, "revnets::exact_view");
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "revnets::exact_view: float32 or float64 views only");
    at::Tensor out = at::empty(q.sizes(), q.options().dtype(dtype));
    const i64* src = q.data_ptr<i64>();
    auto run = [&](auto* v, auto s) {
        at::parallel_for(0, q.numel(), GRAIN, [&](i64 b, i64 e) {
            for (i64 i = b; i < e; i++) v[i] = decltype(s)(src[i]) * s;
        });
    };
    if (dtype == at::kFloat) run(out.data_ptr<float>(), float(scale)); else run(out.data_ptr<double>(), scale);
    return out;
}

}  // namespace

TORCH_LIBRARY(revnets, m) {
    m.set_python_module("revnets.autograd.kernels");  // where the fake (meta) kernels are registered
    m.def("exact_scale_add(Tensor q, Tensor head, Tensor increment, float factor, int n, int d)"
          " -> (Tensor, Tensor, Tensor)");
    m.def("exact_unscale_sub(Tensor q, Tensor head, Tensor increment, float factor, int n, int d)"
          " -> (Tensor, Tensor, Tensor)");
    m.def("exact_add(Tensor q, Tensor increment, float scale, bool subtract, ScalarType dtype)"
          " -> (Tensor, Tensor, Tensor)");
    m.def("exact_view(Tensor q, float scale, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(revnets, CPU, m) {
    m.impl("exact_scale_add", &fused<false>);
    m.impl("exact_unscale_sub", &fused<true>);
    m.impl("exact_add", &add_view);
    m.impl("exact_view", &view);
}
