/* The batch-1 matrix-vector product of a CPU decode step, for x86-64 with AVX2 and FMA (cpu_kernels.py builds it).

   out = residual + W @ input * scale + bias, where input is x, RMSNorm(x) or SwiGLU(x) = silu(gate) * up, rounded to
   the activations' type where the model's PyTorch lines round. W [n, k] is float32, bfloat16, float16 or int8 (with a
   float scale per row). Each thread walks whole rows in order, one row at a time, so the weights stream through
   memory front to back; on the 2-core development CPU that read bf16 weights about a fifth faster than PyTorch's
   product and int8 ones about 1.7x as fast (BENCHMARKS.md): at batch 1, where every weight is read once per token,
   those reads are most of a step. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2, I8 = 3 }; /* cpu_kernels.TYPES */

static float load_one(const void *p, int type, long i) {
    switch (type) {
    case BF16: {
        uint32_t bits = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    case F16: return _cvtsh_ss(((const uint16_t *)p)[i]);
    case I8: return ((const int8_t *)p)[i];
    default: return ((const float *)p)[i];
    }
}

static uint16_t bf16_bits(float v) { /* round to nearest even, as PyTorch does; NaN stays NaN */
    uint32_t bits;
    memcpy(&bits, &v, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

static float rounded(float v, int type) { /* v as the type would store it */
    switch (type) {
    case BF16: {
        uint32_t bits = (uint32_t)bf16_bits(v) << 16;
        memcpy(&v, &bits, 4);
        return v;
    }
    case F16: return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
    default: return v;
    }
}

static void store_one(void *p, int type, long i, float v) {
    switch (type) {
    case BF16: ((uint16_t *)p)[i] = bf16_bits(v); break;
    case F16: ((uint16_t *)p)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT); break;
    default: ((float *)p)[i] = v;
    }
}

/* Eight weights as floats. */
static inline __m256 load8_f32(const void *p) { return _mm256_loadu_ps((const float *)p); }
static inline __m256 load8_bf16(const void *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
static inline __m256 load8_f16(const void *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline __m256 load8_i8(const void *p) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))); }

/* One row's dot product with the float input: four independent sums of eight, then the scalar tail. For int8 the
   hardware prefetcher alone leaves the reads short of the memory's speed, so each step asks for the line 1 KiB ahead. */
#define ROW_DOT(NAME, TYPE, CODE, LOAD8, PREFETCH)                                                             \
    static float NAME(const TYPE *w, const float *in, long k) {                                                \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                            \
        long i = 0;                                                                                            \
        for (; i + 32 <= k; i += 32) {                                                                         \
            if (PREFETCH) _mm_prefetch((const char *)(w + i) + 1024, _MM_HINT_T0);                             \
            a0 = _mm256_fmadd_ps(LOAD8(w + i), _mm256_loadu_ps(in + i), a0);                                   \
            a1 = _mm256_fmadd_ps(LOAD8(w + i + 8), _mm256_loadu_ps(in + i + 8), a1);                           \
            a2 = _mm256_fmadd_ps(LOAD8(w + i + 16), _mm256_loadu_ps(in + i + 16), a2);                         \
            a3 = _mm256_fmadd_ps(LOAD8(w + i + 24), _mm256_loadu_ps(in + i + 24), a3);                         \
        }                                                                                                      \
        __m256 a = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));                                \
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));                         \
        s = _mm_hadd_ps(s, s);                                                                                 \
        float sum = _mm_cvtss_f32(_mm_hadd_ps(s, s));                                                          \
        for (; i < k; i++) sum += load_one(w, CODE, i) * in[i];                                                \
        return sum;                                                                                            \
    }
ROW_DOT(dot_f32, float, F32, load8_f32, 0)
ROW_DOT(dot_bf16, uint16_t, BF16, load8_bf16, 0)
ROW_DOT(dot_f16, uint16_t, F16, load8_f16, 0)
ROW_DOT(dot_i8, int8_t, I8, load8_i8, 1)

static float dot(const void *weight, int type, long row, long k, const float *in) {
    switch (type) {
    case BF16: return dot_bf16((const uint16_t *)weight + row * k, in, k);
    case F16: return dot_f16((const uint16_t *)weight + row * k, in, k);
    case I8: return dot_i8((const int8_t *)weight + row * k, in, k);
    default: return dot_f32((const float *)weight + row * k, in, k);
    }
}

/* The input the product multiplies, in float, rounded where the PyTorch lines round: after silu and after its product
   with up; after the norm's scaling and after its weight. x has 2k values (gate then up) with swiglu, else k. */
static void make_input(float *in, const void *x, int x_type, long k, const void *norm, int norm_type, float eps, int swiglu) {
    if (swiglu) {
        for (long i = 0; i < k; i++) {
            float gate = load_one(x, x_type, i);
            float silu = rounded(gate / (1.0f + expf(-gate)), x_type);
            in[i] = rounded(silu * load_one(x, x_type, k + i), x_type);
        }
        return;
    }
    float squares = 0.0f;
    for (long i = 0; i < k; i++) {
        in[i] = load_one(x, x_type, i);
        squares += in[i] * in[i];
    }
    if (!norm) return;
    float scale = 1.0f / sqrtf(squares / (float)k + eps);
    for (long i = 0; i < k; i++) in[i] = rounded(load_one(norm, norm_type, i) * rounded(in[i] * scale, x_type), x_type);
}

/* Returns 0, or -1 when the input buffer cannot be allocated. */
int qwen3gen_matvec(const void *x, int x_type, const void *weight, int weight_type, long n, long k,
                    const void *scale, int scale_type, const void *bias, int bias_type, const void *norm, int norm_type,
                    float eps, const void *residual, int swiglu, void *out, int threads) {
    float *in = aligned_alloc(32, (size_t)((k + 7) / 8 * 8) * sizeof(float));
    if (!in) return -1;
    make_input(in, x, x_type, k, norm, norm_type, eps, swiglu);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < n; row++) {
        float v = dot(weight, weight_type, row, k, in);
        if (scale) v *= load_one(scale, scale_type, row);
        if (bias) v += load_one(bias, bias_type, row);
        if (residual) v = rounded(v, x_type) + load_one(residual, x_type, row); /* rounded first, as residual + linear(x) */
        store_one(out, x_type, row, v);
    }
    free(in);
    return 0;
}
