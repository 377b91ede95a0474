/* revnets: fused CPU kernels of exact (fixed-point) mode, built by revnets/autograd/kernels.py.
   Each is one pass over memory of the integer arithmetic that revnets/autograd/exact.py also writes as
   separate torch operations, with the same bits (tests/test_exact_arithmetic.py compares both). */
#include <stdint.h>
#include <string.h>
typedef int64_t i64;
#define SAFE 70368744177664.0             /* 2^46 */
#define MAGIC 6755399441055744.0          /* 1.5 · 2^52: its ulp is 1 */
#define MAGIC_BITS 0x4338000000000000LL   /* the bits of MAGIC */

/* Exact conversions of integers |x| < 2^51: x sits in the mantissa of MAGIC + x. */
static inline double to_f64(i64 x) { i64 b = x + MAGIC_BITS; double r; memcpy(&r, &b, 8); return r - MAGIC; }
static inline i64 to_i64(double x) { double y = x + MAGIC; i64 b; memcpy(&b, &y, 8); return b - MAGIC_BITS; }
/* x rounded to an integer, half to even (the default rounding mode), |x| < 2^51. */
static inline double round_even(double x) { return (x + MAGIC) - MAGIC; }
/* floor(a / d) of integers |a| < 2^52, 1 <= d < 2^6, inv = fl(1/d), |a/d| < 2^50: a·inv is within 1/4 of
   a/d, so its nearest integer is floor(a/d) or one more; the remainder's sign tells which (exact products). */
static inline double floor_div(double a, double d, double inv) {
    double q = round_even(a * inv);
    return a - q * d < 0 ? q - 1 : q;
}

/* new = floor((old·sn + (h mod n)) / d) + round(fl(inc·factor)), h -> floor(h/n)·d + (that numerator mod d),
   n = |sn|. stats: [0] 1 if some |fl(inc·factor)| > 2^46 or NaN, [1] min and [2] max of new (and 0), [3] max head. */
#define APPLY(NAME, T) \
void NAME(i64 count, const i64 *old, const i64 *head, const T *inc, double factor, double sn, double d, \
          i64 *out, i64 *head_out, i64 *stats) { \
    const T f = (T)factor; const double n = sn < 0 ? -sn : sn, inv_n = 1.0 / n, inv_d = 1.0 / d; \
    i64 bad = 0, lo = 0, hi = 0, top = 0; \
    for (i64 i = 0; i < count; i++) { \
        double s = (double)(inc[i] * f), m = s < 0 ? -s : s; \
        i64 ok = m <= SAFE; bad |= ok ^ 1; double qi = round_even(ok ? s : 0); /* NaN: not ok */ \
        double h = to_f64(head[i]), hq = floor_div(h, n, inv_n); \
        double a = to_f64(old[i]) * sn + (h - hq * n), q = floor_div(a, d, inv_d); \
        double h2 = hq * d + (a - q * d), v = q + qi; \
        i64 vi = to_i64(v), hi_ = to_i64(h2); out[i] = vi; head_out[i] = hi_; \
        lo = vi < lo ? vi : lo; hi = vi > hi ? vi : hi; top = hi_ > top ? hi_ : top; \
    } \
    stats[0] = bad; stats[1] = lo; stats[2] = hi; stats[3] = top; \
}

/* a = (new - round(fl(inc·factor)))·d + (h mod d), old = sign(sn)·floor(a / n), h -> floor(h/d)·n + (a mod n).
   stats: [0] as above, [1] min and [2] max of new - round(fl(inc·factor)) (and 0), [3] min and [4] max of
   floor(a / n) (and 0). */
#define UNDO(NAME, T) \
void NAME(i64 count, const i64 *new_, const i64 *head, const T *inc, double factor, double sn, double d, \
          i64 *out, i64 *head_out, i64 *stats) { \
    const T f = (T)factor; const double n = sn < 0 ? -sn : sn, inv_n = 1.0 / n, inv_d = 1.0 / d; \
    const double sign = sn < 0 ? -1.0 : 1.0; \
    i64 bad = 0, lo = 0, hi = 0, lo2 = 0, hi2 = 0; \
    for (i64 i = 0; i < count; i++) { \
        double s = (double)(inc[i] * f), m = s < 0 ? -s : s; \
        i64 ok = m <= SAFE; bad |= ok ^ 1; double qi = round_even(ok ? s : 0); /* NaN: not ok */ \
        double o = to_f64(new_[i]) - qi; \
        double c = o > SAFE ? SAFE : o < -SAFE ? -SAFE : o; /* o itself is range-checked */ \
        double h = to_f64(head[i]), hq = floor_div(h, d, inv_d); \
        double a = c * d + (h - hq * d), q = floor_div(a, n, inv_n); \
        out[i] = to_i64(sign * q); head_out[i] = to_i64(hq * n + (a - q * n)); \
        i64 oi = to_i64(c == o ? o : c + c), qq = to_i64(q); /* beyond 2^46: twice the clamp, still beyond */ \
        lo = oi < lo ? oi : lo; hi = oi > hi ? oi : hi; lo2 = qq < lo2 ? qq : lo2; hi2 = qq > hi2 ? qq : hi2; \
    } \
    stats[0] = bad; stats[1] = lo; stats[2] = hi; stats[3] = lo2; stats[4] = hi2; \
}

/* new = old ± inc (wrapping, as torch's int64 arithmetic), view = (T)new · (T)scale: new rounded once to T,
   times the power of two scale in T (dequantize's two steps). stats: [0] min and [1] max of new (and 0). */
#define COMBINE(NAME, T, OP) \
void NAME(i64 count, const i64 *old, const i64 *inc, double scale, i64 *out, T *view, i64 *stats) { \
    const T s = (T)scale; i64 lo = 0, hi = 0; \
    for (i64 i = 0; i < count; i++) { \
        i64 v = (i64)((uint64_t)old[i] OP (uint64_t)inc[i]); out[i] = v; view[i] = (T)v * s; \
        lo = v < lo ? v : lo; hi = v > hi ? v : hi; \
    } \
    stats[0] = lo; stats[1] = hi; \
}

/* view = (T)q · (T)scale, as above. */
#define VIEW(NAME, T) \
void NAME(i64 count, const i64 *q, double scale, T *view) { \
    const T s = (T)scale; \
    for (i64 i = 0; i < count; i++) view[i] = (T)q[i] * s; \
}

APPLY(apply_f32, float)
APPLY(apply_f64, double)
UNDO(undo_f32, float)
UNDO(undo_f64, double)
COMBINE(add_f32, float, +)
COMBINE(add_f64, double, +)
COMBINE(sub_f32, float, -)
COMBINE(sub_f64, double, -)
VIEW(view_f32, float)
VIEW(view_f64, double)
