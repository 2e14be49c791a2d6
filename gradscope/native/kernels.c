/* One-pass statistics of float32/float64 arrays for gradscope's recorder (CPU tensors).
 *
 * Every sum is accumulated in double, so sums of squares are exact to ~1e-16 relative even
 * for float32 subnormals (1e-39 squares to 1e-78, fine in double) and never overflow (a
 * float32 square is at most 1.2e77). Compiled on first use by gradscope/native/__init__.py;
 * where no compiler is found the recorder computes the same statistics with torch ops.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

/* out[0..5] = sum, sum of squares, min, max (both ignoring NaN), non-zeros, non-finite */
#define MOMENTS(NAME, T)                                                                    \
    void NAME(const T* x, int64_t n, double* out) {                                         \
        double s = 0.0, ss = 0.0;                                                           \
        T lo = INFINITY, hi = -INFINITY;                                                    \
        int64_t nonzero = 0, bad = 0;                                                       \
        _Pragma("omp simd simdlen(16) reduction(+ : s, ss, nonzero, bad) reduction(min : lo) reduction(max : hi)") \
        for (int64_t i = 0; i < n; ++i) {                                                   \
            T v = x[i];                                                                     \
            double d = (double)v;                                                           \
            s += d;                                                                         \
            ss += d * d;                                                                    \
            lo = v < lo ? v : lo;                                                           \
            hi = v > hi ? v : hi;                                                           \
            nonzero += (v != 0);                                                            \
            bad += !(v - v == 0); /* inf - inf and NaN - NaN are NaN */                      \
        }                                                                                   \
        out[0] = s; out[1] = ss; out[2] = (double)lo; out[3] = (double)hi;                  \
        out[4] = (double)nonzero; out[5] = (double)bad;                                     \
    }
MOMENTS(moments_f32, float)
MOMENTS(moments_f64, double)

/* out[r] = sum of squares of row r of a rows x cols matrix */
#define ROW_SUMSQ(NAME, T)                                                                  \
    void NAME(const T* x, int64_t rows, int64_t cols, double* out) {                        \
        for (int64_t r = 0; r < rows; ++r) {                                                \
            const T* p = x + r * cols;                                                      \
            double ss = 0.0;                                                                \
            _Pragma("omp simd simdlen(16) reduction(+ : ss)")                                           \
            for (int64_t i = 0; i < cols; ++i) {                                            \
                double d = (double)p[i];                                                    \
                ss += d * d;                                                                \
            }                                                                               \
            out[r] = ss;                                                                    \
        }                                                                                   \
    }
ROW_SUMSQ(row_sumsq_f32, float)
ROW_SUMSQ(row_sumsq_f64, double)

/* for each of k arrays: sum of squares, largest |x| (ignoring NaN), non-finite count */
#define GRAD_STATS(NAME, T)                                                                 \
    void NAME(const T* const* xs, const int64_t* sizes, int64_t k, double* sumsq,           \
              double* maxabs, double* nonfinite) {                                          \
        for (int64_t j = 0; j < k; ++j) {                                                   \
            const T* x = xs[j];                                                             \
            double ss = 0.0;                                                                \
            T m = 0;                                                                        \
            int64_t bad = 0;                                                                \
            _Pragma("omp simd simdlen(16) reduction(+ : ss, bad) reduction(max : m)")                   \
            for (int64_t i = 0; i < sizes[j]; ++i) {                                        \
                T v = x[i];                                                                 \
                double d = (double)v;                                                       \
                ss += d * d;                                                                \
                T a = v < 0 ? -v : v;                                                       \
                m = a > m ? a : m;                                                          \
                bad += !(v - v == 0);                                                       \
            }                                                                               \
            sumsq[j] = ss; maxabs[j] = (double)m; nonfinite[j] = (double)bad;               \
        }                                                                                   \
    }
GRAD_STATS(grad_stats_f32, float)
GRAD_STATS(grad_stats_f64, double)

/* for each of k arrays: copy src into dst and return the sum of squares */
#define SNAPSHOT(NAME, T)                                                                   \
    void NAME(const T* const* src, T* const* dst, const int64_t* sizes, int64_t k,          \
              double* sumsq) {                                                              \
        for (int64_t j = 0; j < k; ++j) {                                                   \
            const T* x = src[j];                                                            \
            T* y = dst[j];                                                                  \
            double ss = 0.0;                                                                \
            _Pragma("omp simd simdlen(16) reduction(+ : ss)")                                           \
            for (int64_t i = 0; i < sizes[j]; ++i) {                                        \
                T v = x[i];                                                                 \
                y[i] = v;                                                                   \
                double d = (double)v;                                                       \
                ss += d * d;                                                                \
            }                                                                               \
            sumsq[j] = ss;                                                                  \
        }                                                                                   \
    }
SNAPSHOT(snapshot_f32, float)
SNAPSHOT(snapshot_f64, double)

/* for each of k pairs: sum of squares of a - b, each difference taken in double (exact) */
#define DIFF_SUMSQ(NAME, T)                                                                 \
    void NAME(const T* const* a, const T* const* b, const int64_t* sizes, int64_t k,        \
              double* sumsq) {                                                              \
        for (int64_t j = 0; j < k; ++j) {                                                   \
            const T* x = a[j];                                                              \
            const T* y = b[j];                                                              \
            double ss = 0.0;                                                                \
            _Pragma("omp simd simdlen(16) reduction(+ : ss)")                                           \
            for (int64_t i = 0; i < sizes[j]; ++i) {                                        \
                double d = (double)x[i] - (double)y[i];                                     \
                ss += d * d;                                                                \
            }                                                                               \
            sumsq[j] = ss;                                                                  \
        }                                                                                   \
    }
DIFF_SUMSQ(diff_sumsq_f32, float)
DIFF_SUMSQ(diff_sumsq_f64, double)
