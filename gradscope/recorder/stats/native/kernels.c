/* One-pass statistics of float32/float64 arrays for gradscope's recorder (CPU tensors).
 *
 * Every sum is accumulated in double, so sums of squares are exact to ~1e-16 relative even
 * for float32 subnormals (1e-39 squares to 1e-78, fine in double) and never overflow (a
 * float32 square is at most 1.2e77). Compiled on first use by native/__init__.py;
 * where no compiler is found the recorder computes the same statistics with torch ops.
 *
 * The parameter kernels read a whole model's tensors at once: their elements, taken as one
 * range, are split evenly over OpenMP's threads. The library links libgomp.so.1, the soname
 * that torch's CPU build has already loaded, so these threads are torch's own (no second pool
 * competing for the cores); below PARALLEL_MIN elements one thread does all. Each thread sums
 * into partial rows of its own, combined in thread order: a result depends only on the
 * thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#else /* built without an OpenMP runtime (see FLAGS in __init__.py): one thread does all */
static int omp_get_max_threads(void) { return 1; }
static int omp_get_num_threads(void) { return 1; }
static int omp_get_thread_num(void) { return 0; }
#endif

#define PARALLEL_MIN (1 << 16)

static int64_t total_of(const int64_t* sizes, int64_t k) {
    int64_t total = 0;
    for (int64_t j = 0; j < k; ++j) total += sizes[j];
    return total;
}

static int threads_for(int64_t total) {
    return total < PARALLEL_MIN ? 1 : omp_get_max_threads();
}

/* this thread's share [lo, hi) of `total` elements */
static void my_share(int64_t total, int64_t* lo, int64_t* hi) {
    int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    *lo = total * t / n;
    *hi = total * (t + 1) / n;
}

/* the part [a, b) of a tensor of `size` elements, starting at element `start` of the whole
 * range, that lies in [lo, hi); false where none does */
static int slice_of(int64_t start, int64_t size, int64_t lo, int64_t hi, int64_t* a,
                    int64_t* b) {
    *a = lo > start ? lo - start : 0;
    *b = hi - start < size ? hi - start : size;
    return *a < *b;
}

/* how many of x are inf or NaN (inf - inf and NaN - NaN are NaN). Called only where a sum
 * came out non-finite: a finite sum of values and of their squares means none is. */
#define COUNT_NONFINITE(NAME, T)                                                            \
    static int64_t NAME(const T* x, int64_t n) {                                            \
        int64_t bad = 0;                                                                    \
        _Pragma("omp simd simdlen(16) reduction(+ : bad)")                                  \
        for (int64_t i = 0; i < n; ++i) bad += !(x[i] - x[i] == 0);                         \
        return bad;                                                                         \
    }
COUNT_NONFINITE(count_nonfinite_f32, float)
COUNT_NONFINITE(count_nonfinite_f64, double)

/* out[0..5] = sum, sum of squares, min, max (both ignoring NaN), non-zeros, non-finite. The
 * non-zeros are counted in 32 bits within blocks of BLOCK elements (a third faster than one
 * 64-bit count: the vector lanes stay float-sized). */
#define BLOCK (1 << 20)
#define MOMENTS(NAME, T, COUNT)                                                             \
    void NAME(const T* x, int64_t n, double* out) {                                         \
        double s = 0.0, ss = 0.0;                                                           \
        T lo = INFINITY, hi = -INFINITY;                                                    \
        int64_t nonzero = 0;                                                                \
        for (int64_t start = 0; start < n; start += BLOCK) {                                \
            int64_t end = n - start < BLOCK ? n : start + BLOCK;                            \
            int32_t nz = 0;                                                                 \
            _Pragma("omp simd simdlen(16) reduction(+ : s, ss, nz) reduction(min : lo) reduction(max : hi)") \
            for (int64_t i = start; i < end; ++i) {                                         \
                T v = x[i];                                                                 \
                double d = (double)v;                                                       \
                s += d;                                                                     \
                ss += d * d;                                                                \
                lo = v < lo ? v : lo;                                                       \
                hi = v > hi ? v : hi;                                                       \
                nz += (v != 0);                                                             \
            }                                                                               \
            nonzero += nz;                                                                  \
        }                                                                                   \
        out[0] = s; out[1] = ss; out[2] = (double)lo; out[3] = (double)hi;                  \
        out[4] = (double)nonzero;                                                           \
        out[5] = isfinite(s) && isfinite(ss) ? 0.0 : (double)COUNT(x, n);                  \
    }
MOMENTS(moments_f32, float, count_nonfinite_f32)
MOMENTS(moments_f64, double, count_nonfinite_f64)

/* units (a feature or a channel) of x, seen as an outer x units x inner array, that are
 * exactly zero at every outer and inner position (NaN is not zero); -1 out of memory. Where
 * units are the last axis (inner == 1) the rows are OR-ed into per-unit flags, stopping
 * once every unit has been seen non-zero; else each unit's inner run is scanned until its
 * first non-zero. */
#define DEAD_UNITS(NAME, T, BITS, MAGNITUDE)                                                 \
    double NAME(const T* x, int64_t outer, int64_t units, int64_t inner) {                  \
        if (units <= 0 || outer <= 0 || inner <= 0) return 0.0;                             \
        BITS* alive = calloc((size_t)units, sizeof(BITS));                                  \
        if (alive == NULL) return -1.0;                                                     \
        int64_t seen = 0;                                                                   \
        if (inner == 1) { /* OR of the values' bits without the sign: 0 only for +-0 */     \
            const BITS* bits = (const BITS*)x;                                              \
            for (int64_t o = 0; o < outer; ++o) {                                           \
                const BITS* row = bits + o * units;                                         \
                _Pragma("omp simd simdlen(16)")                                             \
                for (int64_t u = 0; u < units; ++u) alive[u] |= row[u] & MAGNITUDE;         \
                if ((o & 15) == 0 || o == outer - 1) {                                      \
                    int64_t zero = 0;                                                       \
                    _Pragma("omp simd reduction(+ : zero)")                                 \
                    for (int64_t u = 0; u < units; ++u) zero += alive[u] == 0;              \
                    if (!zero) break;                                                       \
                }                                                                           \
            }                                                                               \
            for (int64_t u = 0; u < units; ++u) alive[u] = alive[u] != 0;                   \
        } else {                                                                            \
            for (int64_t o = 0; o < outer && seen < units; ++o) {                           \
                for (int64_t u = 0; u < units; ++u) {                                       \
                    if (alive[u]) continue;                                                 \
                    const T* p = x + (o * units + u) * inner;                               \
                    for (int64_t i = 0; i < inner; ++i) {                                   \
                        if (p[i] != 0) {                                                    \
                            alive[u] = 1;                                                   \
                            ++seen;                                                         \
                            break;                                                          \
                        }                                                                   \
                    }                                                                       \
                }                                                                           \
            }                                                                               \
        }                                                                                   \
        seen = 0;                                                                           \
        for (int64_t u = 0; u < units; ++u) seen += alive[u] != 0;                          \
        free(alive);                                                                        \
        return (double)(units - seen);                                                      \
    }
DEAD_UNITS(dead_units_f32, float, uint32_t, 0x7fffffffu)
DEAD_UNITS(dead_units_f64, double, uint64_t, 0x7fffffffffffffffull)

/* one module output's row of the recorder's per-call schema (recorder/stats/fields.py
 * OUTPUT): moments() into out[0..5], then the dead units and the units; 0, or -1 out of
 * memory */
#define OUTPUT_ROW(NAME, T, MOMENTS, DEAD)                                                  \
    int NAME(const T* x, int64_t outer, int64_t units, int64_t inner, double* out) {        \
        MOMENTS(x, outer * units * inner, out);                                             \
        double dead = DEAD(x, outer, units, inner);                                         \
        out[6] = dead;                                                                      \
        out[7] = (double)units;                                                             \
        return dead < 0 ? -1 : 0;                                                           \
    }
OUTPUT_ROW(output_row_f32, float, moments_f32, dead_units_f32)
OUTPUT_ROW(output_row_f64, double, moments_f64, dead_units_f64)

/* how many of x lie at least `half` away from `mid` (NaN never does): outputs of a bounded
 * activation near its bounds */
#define SATURATED(NAME, T)                                                                  \
    double NAME(const T* x, int64_t n, double mid, double half) {                           \
        int64_t count = 0;                                                                  \
        _Pragma("omp simd simdlen(16) reduction(+ : count)")                                \
        for (int64_t i = 0; i < n; ++i) {                                                   \
            double d = (double)x[i] - mid;                                                  \
            count += (d < 0 ? -d : d) >= half;                                              \
        }                                                                                   \
        return (double)count;                                                               \
    }
SATURATED(saturated_f32, float)
SATURATED(saturated_f64, double)

/* a gradient as a rows x cols matrix, one row a sample: out[0] = sum of squares, out[1] = sum
 * of the rows' norms, out[2] = rows whose sum of squares is not finite (inf or NaN inside).
 * Four rows are summed side by side (a quarter faster on rows of 128, twice on short rows:
 * fewer horizontal sums), the rows left over one by one. */
#define GRAD_ROWS(NAME, T)                                                                  \
    static void NAME##_add(double ss, double* total, double* norms, int64_t* bad) {         \
        *total += ss;                                                                       \
        *norms += sqrt(ss);                                                                 \
        *bad += !isfinite(ss);                                                              \
    }                                                                                       \
    void NAME(const T* x, int64_t rows, int64_t cols, double* out) {                        \
        double total = 0.0, norms = 0.0;                                                    \
        int64_t bad = 0, r = 0;                                                             \
        for (; r + 4 <= rows; r += 4) {                                                     \
            const T* p = x + r * cols;                                                      \
            double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;                                  \
            _Pragma("omp simd simdlen(8) reduction(+ : s0, s1, s2, s3)")                    \
            for (int64_t i = 0; i < cols; ++i) {                                            \
                double a = (double)p[i], b = (double)p[i + cols];                           \
                double c = (double)p[i + 2 * cols], d = (double)p[i + 3 * cols];            \
                s0 += a * a;                                                                \
                s1 += b * b;                                                                \
                s2 += c * c;                                                                \
                s3 += d * d;                                                                \
            }                                                                               \
            NAME##_add(s0, &total, &norms, &bad);                                           \
            NAME##_add(s1, &total, &norms, &bad);                                           \
            NAME##_add(s2, &total, &norms, &bad);                                           \
            NAME##_add(s3, &total, &norms, &bad);                                           \
        }                                                                                   \
        for (; r < rows; ++r) {                                                             \
            const T* p = x + r * cols;                                                      \
            double ss = 0.0;                                                                \
            _Pragma("omp simd simdlen(16) reduction(+ : ss)")                               \
            for (int64_t i = 0; i < cols; ++i) {                                            \
                double d = (double)p[i];                                                    \
                ss += d * d;                                                                \
            }                                                                               \
            NAME##_add(ss, &total, &norms, &bad);                                           \
        }                                                                                   \
        out[0] = total; out[1] = norms; out[2] = (double)bad;                               \
    }
GRAD_ROWS(grad_rows_f32, float)
GRAD_ROWS(grad_rows_f64, double)

/* for each of k (gradient, parameter) pairs, in one pass over both: the gradient's sum of
 * squares, largest |g| (ignoring NaN) and non-finite count, and the parameter's sum of
 * squares, written to out[j], out[k + j], out[2k + j], out[3k + j] (steps closed without an
 * optimizer, where no update is measured). Returns 0, or -1 where no memory was left for the
 * partial sums. */
#define PARAM_READ(NAME, T, COUNT)                                                          \
    static void NAME##_slice(const T* g, const T* p, int64_t n, double* row, int64_t k) {   \
        double gss = 0.0, pss = 0.0;                                                        \
        T m = 0;                                                                            \
        _Pragma("omp simd simdlen(16) reduction(+ : gss, pss) reduction(max : m)")          \
        for (int64_t i = 0; i < n; ++i) {                                                   \
            T v = g[i], w = p[i];                                                           \
            double d = (double)v, e = (double)w;                                            \
            gss += d * d;                                                                   \
            T a = v < 0 ? -v : v;                                                           \
            m = a > m ? a : m;                                                              \
            pss += e * e;                                                                   \
        }                                                                                   \
        row[0] += gss;                                                                      \
        row[k] = (double)m > row[k] ? (double)m : row[k];                                   \
        if (!isfinite(gss)) row[2 * k] += (double)COUNT(g, n);                              \
        row[3 * k] += pss;                                                                  \
    }                                                                                       \
    int NAME(const T* const* grads, const T* const* params, const int64_t* sizes, int64_t k, \
             double* out) {                                                                 \
        int64_t total = total_of(sizes, k);                                                 \
        int threads = threads_for(total);                                                   \
        double* part = (double*)calloc((size_t)threads * 4 * k + 1, sizeof(double));        \
        if (!part) return -1;                                                               \
        _Pragma("omp parallel num_threads(threads)")                                        \
        {                                                                                   \
            double* mine = part + (size_t)omp_get_thread_num() * 4 * k;                     \
            int64_t lo, hi, a, b, start = 0;                                                \
            my_share(total, &lo, &hi);                                                      \
            for (int64_t j = 0; j < k && start < hi; start += sizes[j++])                   \
                if (slice_of(start, sizes[j], lo, hi, &a, &b))                              \
                    NAME##_slice(grads[j] + a, params[j] + a, b - a, mine + j, k);          \
        }                                                                                   \
        memset(out, 0, (size_t)4 * k * sizeof(double));                                     \
        for (int t = 0; t < threads; ++t) {                                                 \
            const double* r = part + (size_t)t * 4 * k;                                     \
            for (int64_t j = 0; j < k; ++j) {                                               \
                out[j] += r[j];                                                             \
                out[k + j] = r[k + j] > out[k + j] ? r[k + j] : out[k + j];                 \
                out[2 * k + j] += r[2 * k + j];                                             \
                out[3 * k + j] += r[3 * k + j];                                             \
            }                                                                               \
        }                                                                                   \
        free(part);                                                                         \
        return 0;                                                                           \
    }
PARAM_READ(param_read_f32, float, count_nonfinite_f32)
PARAM_READ(param_read_f64, double, count_nonfinite_f64)

/* the parameters before the update: each of k tensors copied to its buffer (`before`), and
 * its sum of squares written to out[j], the elements split over threads as above. (A plain
 * loop, not memcpy: glibc's memcpy of a few hundred kB is twice as slow on some CPUs.) Returns
 * 0, or -1 where no memory was left for the partial sums. */
#define SNAPSHOT(NAME, T)                                                                   \
    static void NAME##_slice(const T* p, T* copy, int64_t n, double* row) {                 \
        double pss = 0.0;                                                                   \
        _Pragma("omp simd simdlen(16) reduction(+ : pss)")                                  \
        for (int64_t i = 0; i < n; ++i) {                                                   \
            T w = p[i];                                                                     \
            copy[i] = w;                                                                    \
            pss += (double)w * (double)w;                                                   \
        }                                                                                   \
        *row += pss;                                                                        \
    }                                                                                       \
    int NAME(const T* const* params, T* const* before, const int64_t* sizes, int64_t k,     \
             double* out) {                                                                 \
        int64_t total = total_of(sizes, k);                                                 \
        int threads = threads_for(total);                                                   \
        double* part = (double*)calloc((size_t)(threads * k) + 1, sizeof(double));          \
        if (!part) return -1;                                                               \
        _Pragma("omp parallel num_threads(threads)")                                        \
        {                                                                                   \
            double* mine = part + (size_t)omp_get_thread_num() * k;                         \
            int64_t lo, hi, a, b, start = 0;                                                \
            my_share(total, &lo, &hi);                                                      \
            for (int64_t j = 0; j < k && start < hi; start += sizes[j++])                   \
                if (slice_of(start, sizes[j], lo, hi, &a, &b))                              \
                    NAME##_slice(params[j] + a, before[j] + a, b - a, mine + j);            \
        }                                                                                   \
        for (int64_t j = 0; j < k; ++j) {                                                   \
            double pss = 0.0;                                                               \
            for (int t = 0; t < threads; ++t) pss += part[(size_t)t * k + j];               \
            out[j] = pss;                                                                   \
        }                                                                                   \
        free(part);                                                                         \
        return 0;                                                                           \
    }
SNAPSHOT(snapshot_f32, float)
SNAPSHOT(snapshot_f64, double)

/* after the update, for each of k (gradient, parameter before, parameter after) triples, in
 * one pass over the three: the gradient's sum of squares, largest |g| (ignoring NaN) and
 * non-finite count, the update's sum of squares (after - before, each difference taken in
 * double: exact) and its dot product with the gradient, written to out[j], out[k + j], ...,
 * out[4k + j]. Returns 0, or -1 where no memory was left for the partial sums. */
#define FIELDS_AFTER 5
#define PARAM_AFTER(NAME, T, COUNT)                                                         \
    static void NAME##_slice(const T* g, const T* x0, const T* x1, int64_t n, double* row,  \
                             int64_t k) {                                                   \
        double gss = 0.0, uss = 0.0, dot = 0.0;                                             \
        T m = 0;                                                                            \
        _Pragma("omp simd simdlen(16) reduction(+ : gss, uss, dot) reduction(max : m)")     \
        for (int64_t i = 0; i < n; ++i) {                                                   \
            T v = g[i];                                                                     \
            double d = (double)v, u = (double)x1[i] - (double)x0[i];                        \
            gss += d * d;                                                                   \
            T a = v < 0 ? -v : v;                                                           \
            m = a > m ? a : m;                                                              \
            uss += u * u;                                                                   \
            dot += u * d;                                                                   \
        }                                                                                   \
        row[0] += gss;                                                                      \
        row[k] = (double)m > row[k] ? (double)m : row[k];                                   \
        if (!isfinite(gss)) row[2 * k] += (double)COUNT(g, n);                              \
        row[3 * k] += uss;                                                                  \
        row[4 * k] += dot;                                                                  \
    }                                                                                       \
    int NAME(const T* const* grads, const T* const* before, const T* const* after,          \
             const int64_t* sizes, int64_t k, double* out) {                                \
        int64_t total = total_of(sizes, k), width = FIELDS_AFTER * k;                       \
        int threads = threads_for(total);                                                   \
        double* part = (double*)calloc((size_t)(threads * width) + 1, sizeof(double));      \
        if (!part) return -1;                                                               \
        _Pragma("omp parallel num_threads(threads)")                                        \
        {                                                                                   \
            double* mine = part + (size_t)omp_get_thread_num() * width;                     \
            int64_t lo, hi, a, b, start = 0;                                                \
            my_share(total, &lo, &hi);                                                      \
            for (int64_t j = 0; j < k && start < hi; start += sizes[j++])                   \
                if (slice_of(start, sizes[j], lo, hi, &a, &b))                              \
                    NAME##_slice(grads[j] + a, before[j] + a, after[j] + a, b - a, mine + j, \
                                 k);                                                        \
        }                                                                                   \
        memset(out, 0, (size_t)width * sizeof(double));                                     \
        for (int t = 0; t < threads; ++t) {                                                 \
            const double* r = part + (size_t)t * width;                                     \
            for (int64_t f = 0; f < width; ++f)                                             \
                out[f] = f / k == 1 ? (r[f] > out[f] ? r[f] : out[f]) : out[f] + r[f];      \
        }                                                                                   \
        free(part);                                                                         \
        return 0;                                                                           \
    }
PARAM_AFTER(param_after_f32, float, count_nonfinite_f32)
PARAM_AFTER(param_after_f64, double, count_nonfinite_f64)
