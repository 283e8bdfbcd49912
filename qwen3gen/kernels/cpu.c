/* The CPU decode step's kernels, for x86-64 with AVX2 and FMA (cpu.py builds them and states their contracts).

   qwen3gen_matvec: out = residual + W @ input * scale + bias, where input is x, RMSNorm(x) or SwiGLU(x) = silu(gate) *
   up, rounded to the activations' type where the model's PyTorch lines round, for each of up to cpu.MATVEC_ROWS input
   rows (each its own norm). W [n, k] is float32, bfloat16, float16 or int8 (with a float scale per row).
   qwen3gen_block_matvec: the same for a W of GGML's block formats, in parts stacked by rows (each part rows of
   blocks of one format, decoded where they are multiplied). Each thread
   walks whole rows in order, so the weights stream through memory front to back, each read once for all input rows:
   in a decode step, where every weight is read once per step, those reads are most of it.
   qwen3gen_new_token and qwen3gen_decode_attention: one new token per row's attention (q/k norm, rotation, writes to
   the paged KV pool; then attention over the row's blocks), where PyTorch takes some twenty small ops a layer. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { F32 = 0, BF16 = 1, F16 = 2, I8 = 3 }; /* cpu.TYPES */
/* GGML's block formats (cpu.BLOCK_TYPES): each block holds 32 weights (256 for the K types) with their scales. */
enum { Q8_0 = 4, Q4_0 = 5, Q5_0 = 6, Q4_K = 7, Q5_K = 8, Q6_K = 9 };
static long block_weights(int type) { return type >= Q4_K ? 256 : 32; }
static long block_bytes(int type) {
    switch (type) {
    case Q8_0: return 34;
    case Q4_0: return 18;
    case Q5_0: return 22;
    case Q4_K: return 144;
    case Q5_K: return 176;
    default: return 210;
    }
}

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

/* Up to eight activations (float32, bf16 or fp16) from index at as floats: count of them, zeros after. */
static inline __m256 load8(const void *p, int type, long at, long count) {
    if (count >= 8) {
        switch (type) {
        case BF16: return load8_bf16((const uint16_t *)p + at);
        case F16: return load8_f16((const uint16_t *)p + at);
        default: return load8_f32((const float *)p + at);
        }
    }
    float part[8] = {0};
    for (long i = 0; i < count; i++) part[i] = load_one(p, type, at + i);
    return _mm256_loadu_ps(part);
}

/* Eight floats as the type would store them: rounded to nearest even, NaN kept a (quiet) NaN, as `rounded`. */
static inline __m256 round8(__m256 v, int type) {
    switch (type) {
    case BF16: {
        __m256i bits = _mm256_castps_si256(v);
        __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd));
        __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        __m256i chosen = _mm256_blendv_epi8(up, _mm256_or_si256(bits, _mm256_set1_epi32(0x400000)), nan);
        return _mm256_castsi256_ps(_mm256_and_si256(chosen, _mm256_set1_epi32((int)0xffff0000)));
    }
    case F16: return _mm256_cvtph_ps(_mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    default: return v;
    }
}

/* Stores count (up to eight) of v at index at, rounded to the type. */
static inline void store8(void *p, int type, long at, __m256 v, long count) {
    if (count >= 8 && type == BF16) {
        __m256i high = _mm256_srli_epi32(_mm256_castps_si256(round8(v, BF16)), 16);
        __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(high), _mm256_extracti128_si256(high, 1));
        _mm_storeu_si128((__m128i *)((uint16_t *)p + at), packed);
    } else if (count >= 8 && type == F16) {
        _mm_storeu_si128((__m128i *)((uint16_t *)p + at), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    } else if (count >= 8) {
        _mm256_storeu_ps((float *)p + at, v);
    } else {
        float part[8];
        _mm256_storeu_ps(part, v);
        for (long i = 0; i < count; i++) store_one(p, type, at + i, part[i]);
    }
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(_mm_hadd_ps(s, s));
}

/* a . b over dim floats (a multiple of 8), in four independent sums: one sum would wait on each product before it. */
static inline float dot_floats(const float *a, const float *b, long dim) {
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    long i = 0;
    for (; i + 32 <= dim; i += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 16), _mm256_loadu_ps(b + i + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 24), _mm256_loadu_ps(b + i + 24), s3);
    }
    for (; i < dim; i += 8) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    return sum8(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
}

/* e^x for eight floats: 2^n * e^r with n = round(x / ln 2), e^r from Cephes' degree-7 polynomial (about 1 ulp);
   below -87.3 (a masked score) it is 0. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(power)); /* n = -127 (x = -88): exponent bits 0, so exactly 0 */
}

/* One row's dot product with the float input: eight independent sums of eight, then the scalar tail. Each step of the
   bf16, fp16 and int8 rows asks for the weights AHEAD bytes on, far enough that the line has arrived when the row
   gets there (BENCHMARKS.md has the distances tried); float32 rows gained nothing from it. */
#define ROW_DOT(NAME, TYPE, CODE, LOAD8, AHEAD)                                                                    \
    static float NAME(const TYPE *w, const float *in, long k) {                                                \
        __m256 a[8];                                                                                           \
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();                                                \
        long i = 0;                                                                                            \
        for (; i + 64 <= k; i += 64) {                                                                         \
            for (int line = 0; AHEAD && line < 64 * (int)sizeof(TYPE); line += 64)                            \
                _mm_prefetch((const char *)(w + i) + AHEAD + line, _MM_HINT_T0);                               \
            for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(LOAD8(w + i + 8 * j), _mm256_loadu_ps(in + i + 8 * j), a[j]); \
        }                                                                                                      \
        for (int j = 0; j < 4; j++) a[j] = _mm256_add_ps(a[j], a[j + 4]);                                      \
        float sum = sum8(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));                 \
        for (; i < k; i++) sum += load_one(w, CODE, i) * in[i];                                                \
        return sum;                                                                                            \
    }
ROW_DOT(dot_f32, float, F32, load8_f32, 0)
ROW_DOT(dot_bf16, uint16_t, BF16, load8_bf16, 4096)
ROW_DOT(dot_f16, uint16_t, F16, load8_f16, 4096)
ROW_DOT(dot_i8, int8_t, I8, load8_i8, 4096)

static float dot(const void *weight, int type, long row, long k, const float *in) {
    switch (type) {
    case BF16: return dot_bf16((const uint16_t *)weight + row * k, in, k);
    case F16: return dot_f16((const uint16_t *)weight + row * k, in, k);
    case I8: return dot_i8((const int8_t *)weight + row * k, in, k);
    default: return dot_f32((const float *)weight + row * k, in, k);
    }
}

/* The widest vectors this build has (cpu.py builds an AVX-512 variant and an AVX2 one): LANES floats, or int32s. The
   block formats' loops below are written once over them. */
#ifdef __AVX512F__
#define LANES 16
typedef __m512 vecf;
typedef __m512i veci;
static inline veci bytes_u(const uint8_t *p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline veci bytes_s(const uint8_t *p) { return _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)); }
static inline veci vi_set(int v) { return _mm512_set1_epi32(v); }
static inline veci vi_and(veci a, int m) { return _mm512_and_si512(a, vi_set(m)); }
static inline veci vi_or(veci a, veci b) { return _mm512_or_si512(a, b); }
static inline veci vi_sub(veci a, int v) { return _mm512_sub_epi32(a, vi_set(v)); }
static inline veci vi_srl(veci a, int n) { return _mm512_srli_epi32(a, n); }
static inline veci vi_sll(veci a, int n) { return _mm512_slli_epi32(a, n); }
static inline veci vi_srlv(veci a, veci n) { return _mm512_srlv_epi32(a, n); }
static inline veci vi_lanes(int from) { return _mm512_add_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), vi_set(from)); }
static inline vecf vf_set(float v) { return _mm512_set1_ps(v); }
static inline vecf vf_zero(void) { return _mm512_setzero_ps(); }
static inline vecf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float *p, vecf v) { _mm512_storeu_ps(p, v); }
static inline vecf vf_int(veci a) { return _mm512_cvtepi32_ps(a); }
static inline vecf vf_mul(vecf a, vecf b) { return _mm512_mul_ps(a, b); }
static inline vecf vf_sub(vecf a, vecf b) { return _mm512_sub_ps(a, b); }
static inline vecf vf_add(vecf a, vecf b) { return _mm512_add_ps(a, b); }
static inline vecf vf_fma(vecf a, vecf b, vecf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vf_sum(vecf v) { return _mm512_reduce_add_ps(v); }
#else
#define LANES 8
typedef __m256 vecf;
typedef __m256i veci;
static inline veci bytes_u(const uint8_t *p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline veci bytes_s(const uint8_t *p) { return _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline veci vi_set(int v) { return _mm256_set1_epi32(v); }
static inline veci vi_and(veci a, int m) { return _mm256_and_si256(a, vi_set(m)); }
static inline veci vi_or(veci a, veci b) { return _mm256_or_si256(a, b); }
static inline veci vi_sub(veci a, int v) { return _mm256_sub_epi32(a, vi_set(v)); }
static inline veci vi_srl(veci a, int n) { return _mm256_srli_epi32(a, n); }
static inline veci vi_sll(veci a, int n) { return _mm256_slli_epi32(a, n); }
static inline veci vi_srlv(veci a, veci n) { return _mm256_srlv_epi32(a, n); }
static inline veci vi_lanes(int from) { return _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), vi_set(from)); }
static inline vecf vf_set(float v) { return _mm256_set1_ps(v); }
static inline vecf vf_zero(void) { return _mm256_setzero_ps(); }
static inline vecf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void vf_store(float *p, vecf v) { _mm256_storeu_ps(p, v); }
static inline vecf vf_int(veci a) { return _mm256_cvtepi32_ps(a); }
static inline vecf vf_mul(vecf a, vecf b) { return _mm256_mul_ps(a, b); }
static inline vecf vf_sub(vecf a, vecf b) { return _mm256_sub_ps(a, b); }
static inline vecf vf_add(vecf a, vecf b) { return _mm256_add_ps(a, b); }
static inline vecf vf_fma(vecf a, vecf b, vecf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vf_sum(vecf v) { return sum8(v); }
#endif

static inline float half_at(const uint8_t *p) {
    uint16_t bits;
    memcpy(&bits, p, 2);
    return _cvtsh_ss(bits);
}

/* One block's weights as floats, each computed as the gguf package's dequantize computes it (the same products in
   float, in the same order), so that a dequantized tensor is the same bits. */
static inline void floats_q8_0(const uint8_t *b, float *out) {
    vecf d = vf_set(half_at(b));
    for (int i = 0; i < 32; i += LANES) vf_store(out + i, vf_mul(vf_int(bytes_s(b + 2 + i)), d));
}
static inline void floats_q4_0(const uint8_t *b, float *out) { /* low nibbles: weights 0-15, high ones 16-31 */
    vecf d = vf_set(half_at(b));
    for (int i = 0; i < 16; i += LANES) {
        veci q = bytes_u(b + 2 + i);
        vf_store(out + i, vf_mul(d, vf_int(vi_sub(vi_and(q, 15), 8))));
        vf_store(out + 16 + i, vf_mul(d, vf_int(vi_sub(vi_srl(q, 4), 8))));
    }
}
static inline void floats_q5_0(const uint8_t *b, float *out) { /* bit i of the 32-bit qh is weight i's fifth bit */
    vecf d = vf_set(half_at(b));
    uint32_t high;
    memcpy(&high, b + 2, 4);
    veci qh = vi_set((int)high);
    for (int i = 0; i < 16; i += LANES) {
        veci q = bytes_u(b + 6 + i);
        veci low_bits = vi_sll(vi_and(vi_srlv(qh, vi_lanes(i)), 1), 4), high_bits = vi_sll(vi_and(vi_srlv(qh, vi_lanes(16 + i)), 1), 4);
        vf_store(out + i, vf_mul(d, vf_int(vi_sub(vi_or(vi_and(q, 15), low_bits), 16))));
        vf_store(out + 16 + i, vf_mul(d, vf_int(vi_sub(vi_or(vi_srl(q, 4), high_bits), 16))));
    }
}
/* Q4_K and Q5_K: eight sub-blocks of 32, each with a 6-bit scale and minimum packed into 12 bytes. */
static inline void scales_mins_k(const uint8_t *s, float d, float dmin, float *scale, float *min) {
    for (int j = 0; j < 8; j++) {
        int sc = j < 4 ? s[j] & 63 : (s[j + 4] & 15) | ((s[j - 4] >> 6) << 4);
        int m = j < 4 ? s[j + 4] & 63 : (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        scale[j] = d * (float)sc;
        min[j] = dmin * (float)m;
    }
}
static inline void floats_q4_k(const uint8_t *b, float *out) { /* each 32 bytes of qs: a sub-block low, the next high */
    float scale[8], min[8];
    scales_mins_k(b + 4, half_at(b), half_at(b + 2), scale, min);
    for (int c = 0; c < 4; c++) {
        const uint8_t *qs = b + 16 + 32 * c;
        vecf d0 = vf_set(scale[2 * c]), m0 = vf_set(min[2 * c]), d1 = vf_set(scale[2 * c + 1]), m1 = vf_set(min[2 * c + 1]);
        for (int l = 0; l < 32; l += LANES) {
            veci q = bytes_u(qs + l);
            vf_store(out + 64 * c + l, vf_sub(vf_mul(d0, vf_int(vi_and(q, 15))), m0));
            vf_store(out + 64 * c + 32 + l, vf_sub(vf_mul(d1, vf_int(vi_srl(q, 4))), m1));
        }
    }
}
static inline void floats_q5_k(const uint8_t *b, float *out) { /* sub-block s's fifth bits: bit s of qh's 32 bytes */
    float scale[8], min[8];
    scales_mins_k(b + 4, half_at(b), half_at(b + 2), scale, min);
    const uint8_t *qh = b + 16;
    for (int s = 0; s < 8; s++) {
        const uint8_t *qs = b + 48 + 32 * (s / 2);
        vecf d = vf_set(scale[s]), m = vf_set(min[s]);
        for (int l = 0; l < 32; l += LANES) {
            veci q = bytes_u(qs + l), high = vi_sll(vi_and(vi_srl(bytes_u(qh + l), s), 1), 4);
            vf_store(out + 32 * s + l, vf_sub(vf_mul(d, vf_int(vi_or(s % 2 ? vi_srl(q, 4) : vi_and(q, 15), high))), m));
        }
    }
}
static inline void floats_q6_k(const uint8_t *b, float *out) { /* two halves of 128: 64 bytes of ql, 32 of qh each */
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = half_at(b + 208);
    for (int h = 0; h < 2; h++)
        for (int u = 0; u < 4; u++)
            for (int l = 0; l < 32; l += LANES) {
                long at = 128 * h + 32 * u + l;
                veci low = bytes_u(ql + 64 * h + 32 * (u % 2) + l), high = vi_and(vi_srl(bytes_u(qh + 32 * h + l), 2 * u), 3);
                veci q = vi_sub(vi_or(u < 2 ? vi_and(low, 15) : vi_srl(low, 4), vi_sll(high, 4)), 32);
                vf_store(out + at, vf_mul(vf_set(d * (float)sc[at / 16]), vf_int(q)));
            }
}

static inline void block_floats(int type, const uint8_t *b, float *out) {
    switch (type) {
    case Q8_0: floats_q8_0(b, out); break;
    case Q4_0: floats_q4_0(b, out); break;
    case Q5_0: floats_q5_0(b, out); break;
    case Q4_K: floats_q4_k(b, out); break;
    case Q5_K: floats_q5_k(b, out); break;
    default: floats_q6_k(b, out);
    }
}

/* One row of blocks . in (k floats), the blocks decoded in registers: per block (or sub-block), the integer levels'
   dot product with the input, then times the block's scale; the K formats' minimums times the input's sums over
   each 16 (`sums`, made once per input row). The same sum as the dequantized weights' up to float rounding. */
static inline vecf level_dot(veci q, const float *in, vecf acc) { return vf_fma(vf_int(q), vf_load(in), acc); }

static float dot_q8_0(const uint8_t *w, const float *in, const float *sums, long k) {
    vecf acc = vf_zero();
    (void)sums;
    for (long b = 0; b < k / 32; b++, w += 34, in += 32) {
        _mm_prefetch((const char *)w + 4096, _MM_HINT_T0);
        vecf p = vf_zero();
        for (int i = 0; i < 32; i += LANES) p = level_dot(bytes_s(w + 2 + i), in + i, p);
        acc = vf_fma(vf_set(half_at(w)), p, acc);
    }
    return vf_sum(acc);
}
static float dot_q4_0(const uint8_t *w, const float *in, const float *sums, long k) {
    vecf acc = vf_zero();
    (void)sums;
    for (long b = 0; b < k / 32; b++, w += 18, in += 32) {
        _mm_prefetch((const char *)w + 4096, _MM_HINT_T0);
        vecf p = vf_zero();
        for (int i = 0; i < 16; i += LANES) {
            veci q = bytes_u(w + 2 + i);
            p = level_dot(vi_sub(vi_and(q, 15), 8), in + i, p);
            p = level_dot(vi_sub(vi_srl(q, 4), 8), in + 16 + i, p);
        }
        acc = vf_fma(vf_set(half_at(w)), p, acc);
    }
    return vf_sum(acc);
}
static float dot_q5_0(const uint8_t *w, const float *in, const float *sums, long k) {
    vecf acc = vf_zero();
    (void)sums;
    for (long b = 0; b < k / 32; b++, w += 22, in += 32) {
        _mm_prefetch((const char *)w + 4096, _MM_HINT_T0);
        uint32_t high;
        memcpy(&high, w + 2, 4);
        veci qh = vi_set((int)high);
        vecf p = vf_zero();
        for (int i = 0; i < 16; i += LANES) {
            veci q = bytes_u(w + 6 + i);
            veci low_bits = vi_sll(vi_and(vi_srlv(qh, vi_lanes(i)), 1), 4), high_bits = vi_sll(vi_and(vi_srlv(qh, vi_lanes(16 + i)), 1), 4);
            p = level_dot(vi_sub(vi_or(vi_and(q, 15), low_bits), 16), in + i, p);
            p = level_dot(vi_sub(vi_or(vi_srl(q, 4), high_bits), 16), in + 16 + i, p);
        }
        acc = vf_fma(vf_set(half_at(w)), p, acc);
    }
    return vf_sum(acc);
}
static float dot_q4_k(const uint8_t *w, const float *in, const float *sums, long k) {
    vecf acc = vf_zero();
    float low = 0.0f;
    for (long b = 0; b < k / 256; b++, w += 144, in += 256, sums += 16) {
        _mm_prefetch((const char *)w + 4096, _MM_HINT_T0);
        _mm_prefetch((const char *)w + 4096 + 64, _MM_HINT_T0);
        float scale[8], min[8];
        scales_mins_k(w + 4, half_at(w), half_at(w + 2), scale, min);
        for (int c = 0; c < 4; c++) {
            const uint8_t *qs = w + 16 + 32 * c;
            vecf p0 = vf_zero(), p1 = vf_zero();
            for (int l = 0; l < 32; l += LANES) {
                veci q = bytes_u(qs + l);
                p0 = level_dot(vi_and(q, 15), in + 64 * c + l, p0);
                p1 = level_dot(vi_srl(q, 4), in + 64 * c + 32 + l, p1);
            }
            acc = vf_fma(vf_set(scale[2 * c + 1]), p1, vf_fma(vf_set(scale[2 * c]), p0, acc));
        }
        for (int s = 0; s < 8; s++) low += min[s] * (sums[2 * s] + sums[2 * s + 1]);
    }
    return vf_sum(acc) - low;
}
static float dot_q5_k(const uint8_t *w, const float *in, const float *sums, long k) {
    vecf acc = vf_zero();
    float low = 0.0f;
    for (long b = 0; b < k / 256; b++, w += 176, in += 256, sums += 16) {
        _mm_prefetch((const char *)w + 4096, _MM_HINT_T0);
        _mm_prefetch((const char *)w + 4096 + 64, _MM_HINT_T0);
        float scale[8], min[8];
        scales_mins_k(w + 4, half_at(w), half_at(w + 2), scale, min);
        vecf p[8];
        for (int s = 0; s < 8; s++) p[s] = vf_zero();
        for (int l = 0; l < 32; l += LANES) {
            veci qh = bytes_u(w + 16 + l);
            for (int c = 0; c < 4; c++) {
                veci q = bytes_u(w + 48 + 32 * c + l);
                veci h0 = vi_sll(vi_and(vi_srl(qh, 2 * c), 1), 4), h1 = vi_sll(vi_and(vi_srl(qh, 2 * c + 1), 1), 4);
                p[2 * c] = level_dot(vi_or(vi_and(q, 15), h0), in + 64 * c + l, p[2 * c]);
                p[2 * c + 1] = level_dot(vi_or(vi_srl(q, 4), h1), in + 64 * c + 32 + l, p[2 * c + 1]);
            }
        }
        for (int s = 0; s < 8; s++) {
            acc = vf_fma(vf_set(scale[s]), p[s], acc);
            low += min[s] * (sums[2 * s] + sums[2 * s + 1]);
        }
    }
    return vf_sum(acc) - low;
}
static float dot_q6_k(const uint8_t *w, const float *in, const float *sums, long k) {
    vecf acc = vf_zero();
    (void)sums;
    for (long b = 0; b < k / 256; b++, w += 210, in += 256) {
        for (int line = 0; line < 256; line += 64) _mm_prefetch((const char *)w + 4096 + line, _MM_HINT_T0);
        const int8_t *sc = (const int8_t *)(w + 192);
        float d = half_at(w + 208);
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 32; l += LANES) { /* each LANES-wide step lies within one scale's 16 weights */
                veci qh = bytes_u(w + 128 + 32 * h + l), ql0 = bytes_u(w + 64 * h + l), ql1 = bytes_u(w + 64 * h + 32 + l);
                veci low[4] = {vi_and(ql0, 15), vi_and(ql1, 15), vi_srl(ql0, 4), vi_srl(ql1, 4)};
                for (int u = 0; u < 4; u++) {
                    long at = 128 * h + 32 * u + l;
                    veci q = vi_sub(vi_or(low[u], vi_sll(vi_and(vi_srl(qh, 2 * u), 3), 4)), 32);
                    acc = vf_fma(vf_set(d * (float)sc[at / 16]), level_dot(q, in + at, vf_zero()), acc);
                }
            }
    }
    return vf_sum(acc);
}

static float dot_blocks(const uint8_t *w, int type, long k, const float *in, const float *sums) {
    switch (type) {
    case Q8_0: return dot_q8_0(w, in, sums, k);
    case Q4_0: return dot_q4_0(w, in, sums, k);
    case Q5_0: return dot_q5_0(w, in, sums, k);
    case Q4_K: return dot_q4_k(w, in, sums, k);
    case Q5_K: return dot_q5_k(w, in, sums, k);
    default: return dot_q6_k(w, in, sums, k);
    }
}

#ifdef __AVX512BW__
/* With AVX-512, a bf16 model's single input row is multiplied in integers (Q8_0 aside): each group of its values (a
   block's 32, a K superblock's 256) becomes 16-bit integers times one power of two per group (make_words), the
   blocks' levels become 16-bit integers (times Q6_K's integer sub-block scales, which fit beside them), and each 32
   products are one multiply-add of 16-bit pairs into 32-bit sums (VNNI's vpdpwssd; madd and add without it), exact
   (Q4_K and Q5_K take bytes instead: make_bytes). Per group the sum is then scaled in float. A bf16 value keeps all
   its bits where it is within 2^7 of its group's largest; any other is off by at most 2^-16 of that largest, far
   below the rounding of the bf16 result. The formats' minimums and offsets multiply the same integer input's sums,
   so the result is the dequantized weights' product with that input, to float rounding. */
static inline __m512i dot_pairs(__m512i acc, __m512i a, __m512i b) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, a, b);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b));
#endif
}
/* Each row's blocks are read once: asking for them this far ahead keeps the memory reads going under the arithmetic. */
#define AHEAD 8192
static inline void prefetch(const uint8_t *w, int bytes) {
    for (int line = 0; line < bytes; line += 64) _mm_prefetch((const char *)w + AHEAD + line, _MM_HINT_T0);
}
static inline __m512i words_u(const uint8_t *p) { return _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p)); }
static inline __m512i words_in(const int16_t *p) { return _mm512_loadu_si512(p); }
static inline __m512i set16(int v) { return _mm512_set1_epi16((short)v); }
static inline __m512i nibble_words(const uint8_t *p) { /* 16 bytes: their low nibbles, then their high ones */
    __m256i q = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    __m256i low = _mm256_and_si256(q, _mm256_set1_epi16(15)), high = _mm256_srli_epi16(q, 4);
    return _mm512_inserti64x4(_mm512_castsi256_si512(low), high, 1);
}
static inline float half_scale(const uint8_t *p, float group_scale) { return half_at(p) * group_scale; }

/* in [k] floats -> words [k], scales [k / group] and sums [k / 32] (each 32 words' sum, times its group's scale);
   with pairs, each two blocks' words in the order dotw_nibbles meets them: the first 16 of each, then the last 16. */
static void make_words(const float *in, long k, long group, int pairs, int16_t *words, float *scales, float *sums) {
    for (long g = 0; g < k / group; g++) {
        const float *v = in + g * group;
        __m512 largest = _mm512_setzero_ps();
        for (long i = 0; i < group; i += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(v + i)));
        float top = _mm512_reduce_max_ps(largest);
        int e = 0;
        frexpf(top, &e);   /* top = m 2^e, m in [0.5, 1): top 2^(15 - e) < 2^15 */
        e = e < -100 ? -100 : e; /* a group of (near) zeros: its scale stays a float */
        __m512 up = _mm512_set1_ps(isfinite(top) ? ldexpf(1.0f, 15 - (int)e) : top);
        scales[g] = isfinite(top) ? ldexpf(1.0f, (int)e - 15) : top;
        for (long i = 0; i < group; i += 16) {
            __m512i n = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + i), up)); /* to nearest, ties even */
            _mm256_storeu_si256((__m256i *)(words + g * group + i), _mm512_cvtsepi32_epi16(n)); /* 2^15 saturates */
        }
        for (long s = 0; s < group; s += 32) {
            __m512i w = _mm512_madd_epi16(words_in(words + g * group + s), set16(1));
            sums[(g * group + s) / 32] = (float)_mm512_reduce_add_epi32(w) * scales[g];
        }
    }
    for (long b = 0; pairs && b + 1 < k / 32; b += 2) {
        int16_t both[64];
        memcpy(both, words + 32 * b, sizeof both);
        for (int half = 0; half < 4; half++) memcpy(words + 32 * b + 16 * half, both + 16 * (half / 2 + 2 * (half % 2)), 32);
    }
}

/* Q4_0 (fifth 0) and Q5_0 (fifth 1, its fifth bits in a 32-bit qh) blocks two at a time: one load of both blocks' 16
   bytes of nibbles, whose low nibbles are weights 0-15 of each and high ones 16-31, against the input's words in that
   order (pair_blocks). An odd last block goes alone, its words in their own order. */
static inline __attribute__((always_inline)) float dotw_nibbles(const uint8_t *w, const int16_t *in, const float *scales,
                                                                const float *sums, long k, const int fifth) {
    const long size = fifth ? 22 : 18, at = fifth ? 6 : 2, blocks = k / 32;
    __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    float low = 0.0f;
    long b = 0;
    for (; b + 1 < blocks; b += 2, w += 2 * size, in += 64) {
        __m128i first = _mm_loadu_si128((const __m128i *)(w + at)), second = _mm_loadu_si128((const __m128i *)(w + size + at));
        __m512i q = _mm512_cvtepu8_epi16(_mm256_inserti128_si256(_mm256_castsi128_si256(first), second, 1));
        __m512i lo = _mm512_and_si512(q, set16(15)), hi = _mm512_srli_epi16(q, 4);
        if (fifth) {
            uint32_t h0, h1;
            memcpy(&h0, w + 2, 4);
            memcpy(&h1, w + size + 2, 4);
            lo = _mm512_or_si512(lo, _mm512_maskz_mov_epi16((h0 & 0xFFFF) | (h1 << 16), set16(16)));
            hi = _mm512_or_si512(hi, _mm512_maskz_mov_epi16((h0 >> 16) | (h1 & 0xFFFF0000), set16(16)));
        }
        __m512i p = dot_pairs(dot_pairs(_mm512_setzero_si512(), lo, words_in(in)), hi, words_in(in + 32));
        float d0 = half_at(w), d1 = half_at(w + size);
        __m512 scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(d0 * scales[b]), _mm512_set1_ps(d1 * scales[b + 1]));
        acc[b / 2 % 2] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(p), acc[b / 2 % 2]);
        low += d0 * sums[b] + d1 * sums[b + 1];
    }
    if (b < blocks) {
        __m512i levels = nibble_words(w + at);
        if (fifth) {
            uint32_t high;
            memcpy(&high, w + 2, 4);
            levels = _mm512_or_si512(levels, _mm512_maskz_mov_epi16(high, set16(16)));
        }
        __m512 p = _mm512_cvtepi32_ps(dot_pairs(_mm512_setzero_si512(), levels, words_in(in)));
        acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(half_scale(w, scales[b])), p, acc[0]);
        low += half_at(w) * sums[b];
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1])) - (fifth ? 16.0f : 8.0f) * low; /* levels q + 8, q + 16 */
}
static float dotw_q4_0(const uint8_t *w, const int16_t *in, const float *scales, const float *sums, long k) {
    return dotw_nibbles(w, in, scales, sums, k, 0);
}
static float dotw_q5_0(const uint8_t *w, const int16_t *in, const float *scales, const float *sums, long k) {
    return dotw_nibbles(w, in, scales, sums, k, 1);
}

/* Q4_K's and Q5_K's 6-bit sub-block scales (bytes 0-7) and minimums (8-15) from their 12 bytes, four at a time. */
static inline __m128i scale_min_bytes(const uint8_t *p) {
    uint32_t u[4];
    memcpy(u, p, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0f) | (((u[1] >> 6) & 0x03030303) << 4); /* minimums 4-7 */
    uint32_t mins = u[1] & 0x3f3f3f3f;                                        /* minimums 0-3 */
    u[1] = (u[2] & 0x0f0f0f0f) | (((u[0] >> 6) & 0x03030303) << 4);          /* scales 4-7 */
    u[2] = mins;
    u[0] &= 0x3f3f3f3f;                                                       /* scales 0-3 */
    return _mm_loadu_si128((const __m128i *)u);
}
static inline __m512 k_finish(__m512i a[4], const uint8_t *w, float group_scale, __m512 acc) {
    __m512i sum = _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]));
    return _mm512_fmadd_ps(_mm512_set1_ps(half_scale(w, group_scale)), _mm512_cvtepi32_ps(sum), acc);
}
/* Each product below is at most 32 times 128 times 2^15, each 32-bit lane of a superblock's sums adds 16 of them:
   below 2^31. */
static float dotw_q6_k(const uint8_t *w, const int16_t *in, const float *scales, const float *sums, long k) {
    __m512 acc = _mm512_setzero_ps();
    (void)sums;
    for (long b = 0; b < k / 256; b++, w += 210, in += 256) {
        prefetch(w, 210);
        /* the sixteen int8 scales as words; group_pair[g / 2] puts g's in words 0-15 and g + 1's in 16-31 */
        __m512i sc = _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(w + 192))));
        __m512i a[4];
        for (int h = 0; h < 2; h++) {
            __m512i qh = words_u(w + 128 + 32 * h), ql0 = words_u(w + 64 * h), ql1 = words_u(w + 64 * h + 32);
            __m512i low[4] = {_mm512_and_si512(ql0, set16(15)), _mm512_and_si512(ql1, set16(15)), _mm512_srli_epi16(ql0, 4),
                              _mm512_srli_epi16(ql1, 4)};
            for (int u = 0; u < 4; u++) { /* 32 weights: two scales' 16 */
                int g = 8 * h + 2 * u;
                __m512i high = u < 2 ? _mm512_slli_epi16(qh, 4 - 2 * u) : u > 2 ? _mm512_srli_epi16(qh, 2 * u - 4) : qh;
                __m512i levels = _mm512_sub_epi16(_mm512_ternarylogic_epi32(low[u], high, set16(48), 0xF8), set16(32)); /* a | b & c */
                __m512i two = _mm512_permutexvar_epi16(_mm512_or_si512(_mm512_srli_epi16(_mm512_set_epi16(
                    31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), 4), set16(g)), sc);
                __m512i products = _mm512_mullo_epi16(levels, two);
                a[u] = h ? dot_pairs(a[u], products, words_in(in + 128 * h + 32 * u))
                         : dot_pairs(_mm512_setzero_si512(), products, words_in(in + 32 * u));
            }
        }
        acc = k_finish(a, w + 208, scales[b], acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* Q4_K goes through bytes instead: each 64 of its levels (bytes 0-15) multiply 64 input bytes in one vpdpbusd (VNNI;
   two multiply-adds without it), four products to a 32-bit lane, where the words above take a scaling multiply and a
   multiply-add for 32.
   The input becomes integers below 2^14 times a power of two per superblock (a bf16 value keeps all its bits where it
   is within 2^6 of its superblock's largest), each split into two signed bytes, x = 256 high + low (low in [-128,
   128)), so that a lane's products with high and with low are each one vpdpbusd, and 256 times the first plus the
   second is the exact sum. Each lane holds four weights of one sub-block: its sum times the sub-block's integer scale
   (one 32-bit multiply per 64 weights) stays below 2^28 over a superblock. The bytes of each superblock are stored
   in the order the levels come: sub-blocks 0, 2, 1, 3, 4, 6, 5, 7 (each 64 bytes of qs hold two sub-blocks' low
   nibbles, then the next two's high ones). */
static inline __m512i dot_quads(__m512i acc, __m512i levels, __m512i bytes) { /* unsigned levels, signed bytes */
#ifdef __AVX512VNNI__
    return _mm512_dpbusd_epi32(acc, levels, bytes);
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(levels, bytes), set16(1))); /* pairs: < 2^12 */
#endif
}
static const int SUB_BLOCK_ORDER[8] = {0, 2, 1, 3, 4, 6, 5, 7};
/* in [k] floats -> high and low bytes [k] each (in SUB_BLOCK_ORDER), scales [k / 256] and sums [k / 32] (each 32
   values' integer sum times the scale, in the input's order). */
static void make_bytes(const float *in, long k, int8_t *high, int8_t *low, float *scales, float *sums) {
    for (long g = 0; g < k / 256; g++) {
        const float *v = in + g * 256;
        __m512 largest = _mm512_setzero_ps();
        for (int i = 0; i < 256; i += 16) largest = _mm512_max_ps(largest, _mm512_abs_ps(_mm512_loadu_ps(v + i)));
        float top = _mm512_reduce_max_ps(largest);
        int e = 0;
        frexpf(top, &e); /* top = m 2^e, m in [0.5, 1): top 2^(14 - e) < 2^14 */
        e = e < -100 ? -100 : e;
        __m512 up = _mm512_set1_ps(isfinite(top) ? ldexpf(1.0f, 14 - e) : top);
        scales[g] = isfinite(top) ? ldexpf(1.0f, e - 14) : top;
        for (int s = 0; s < 8; s++) {
            __m512i total = _mm512_setzero_si512();
            for (int i = 0; i < 32; i += 16) {
                __m512i x = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(v + 32 * s + i), up)); /* ties even */
                __m512i h = _mm512_srai_epi32(_mm512_add_epi32(x, _mm512_set1_epi32(128)), 8);
                long at = g * 256 + 32 * SUB_BLOCK_ORDER[s] + i;
                _mm_storeu_si128((__m128i *)(high + at), _mm512_cvtepi32_epi8(h));
                __m512i l = _mm512_sub_epi32(x, _mm512_slli_epi32(h, 8));
                _mm_storeu_si128((__m128i *)(low + at), _mm512_cvtepi32_epi8(l));
                total = _mm512_add_epi32(total, x);
            }
            sums[g * 8 + s] = (float)_mm512_reduce_add_epi32(total) * scales[g];
        }
    }
}
/* Q4_K (fifth 0) and Q5_K (fifth 1: after the scales, 32 bytes whose bit s is sub-block s's fifth bits). */
static inline __attribute__((always_inline)) float dotb_k(const uint8_t *w, const int8_t *high, const int8_t *low,
                                                          const float *scales, const float *sums, long k,
                                                          const int fifth) {
    const long size = fifth ? 176 : 144, at = fifth ? 48 : 16;
    __m512 acc = _mm512_setzero_ps();
    __m256 lows = _mm256_setzero_ps();
    const __m512i halves = _mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i fifteen = _mm512_set1_epi8(15);
    for (long b = 0; b < k / 256; b++, w += size, high += 256, low += 256, sums += 8) {
        prefetch(w, (int)size);
        __m512i bytes = _mm512_cvtepu8_epi32(scale_min_bytes(w + 4)); /* lanes 0-7 the scales, 8-15 the minimums */
        __m256 mins = _mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(bytes, 1));
        lows = _mm256_fmadd_ps(_mm256_set1_ps(half_at(w + 2)), _mm256_mul_ps(mins, _mm256_loadu_ps(sums)), lows);
        __m512i qh = _mm512_setzero_si512(); /* Q5_K's fifth bits, in both halves */
        if (fifth) qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(w + 16)));
        __m512i total = _mm512_setzero_si512();
        for (int j = 0; j < 2; j++) { /* 64 bytes of qs: sub-blocks 4j and 4j + 2 low, 4j + 1 and 4j + 3 high */
            __m512i q = _mm512_loadu_si512(w + at + 64 * j);
            __m512i levels[2] = {_mm512_and_si512(q, fifteen), _mm512_and_si512(_mm512_srli_epi16(q, 4), fifteen)};
            for (int n = 0; n < 2; n++) {
                if (fifth) { /* sub-block 4j + n's fifth bits in the first 32 bytes, 4j + n + 2's in the next */
                    __m512i bit = _mm512_mask_blend_epi64(0xF0, _mm512_set1_epi8((char)(1 << (4 * j + n))),
                                                          _mm512_set1_epi8((char)(1 << (4 * j + n + 2))));
                    __mmask64 set = _mm512_test_epi8_mask(qh, bit);
                    levels[n] = _mm512_mask_add_epi8(levels[n], set, levels[n], _mm512_set1_epi8(16));
                }
                const int8_t *h = high + 128 * j + 64 * n, *l = low + 128 * j + 64 * n;
                __m512i part = dot_quads(_mm512_setzero_si512(), levels[n], _mm512_loadu_si512(h));
                part = dot_quads(_mm512_slli_epi32(part, 8), levels[n], _mm512_loadu_si512(l));
                __m512i scale = _mm512_permutexvar_epi32(_mm512_add_epi32(halves, _mm512_set1_epi32(4 * j + n)), bytes);
                total = _mm512_add_epi32(total, _mm512_mullo_epi32(part, scale));
            }
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(half_scale(w, scales[b])), _mm512_cvtepi32_ps(total), acc);
    }
    return _mm512_reduce_add_ps(acc) - sum8(lows);
}
static float dotb_blocks(const uint8_t *w, int type, long k, const int8_t *high, const int8_t *low, const float *scales,
                         const float *sums) {
    return type == Q4_K ? dotb_k(w, high, low, scales, sums, k, 0) : dotb_k(w, high, low, scales, sums, k, 1);
}

static float dotw_blocks(const uint8_t *w, int type, long k, const int16_t *in, const float *scales, const float *sums) {
    switch (type) {
    case Q4_0: return dotw_q4_0(w, in, scales, sums, k);
    case Q5_0: return dotw_q5_0(w, in, scales, sums, k);
    default: return dotw_q6_k(w, in, scales, sums, k);
    }
}
#endif

/* A row of blocks (k weights) as k floats. */
static void row_floats(const uint8_t *w, int type, long k, float *out) {
    long per = block_weights(type), bytes = block_bytes(type);
    for (long b = 0; b < k / per; b++) block_floats(type, w + b * bytes, out + b * per);
}

/* blocks [rows, k / block weights blocks] -> out [rows, k] as float32, bfloat16 or float16 (rounded to nearest even).
   Returns 0, or -1 when a row's buffer cannot be allocated. */
int qwen3gen_dequantize(const uint8_t *blocks, int type, long rows, long k, void *out, int out_type, int threads) {
    long row_bytes = k / block_weights(type) * block_bytes(type);
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *buffer = out_type == F32 ? NULL : aligned_alloc(64, (size_t)(k + 15) / 16 * 16 * sizeof(float));
        if (out_type != F32 && !buffer) failed = 1;
#pragma omp for schedule(static)
        for (long r = 0; r < rows; r++) {
            if (out_type == F32) {
                row_floats(blocks + r * row_bytes, type, k, (float *)out + r * k);
            } else if (buffer) {
                row_floats(blocks + r * row_bytes, type, k, buffer);
                for (long i = 0; i < k; i += 8) store8(out, out_type, r * k + i, _mm256_loadu_ps(buffer + i), k - i);
            }
        }
        free(buffer);
    }
    return failed ? -1 : 0;
}

/* The input the product multiplies, in float, rounded where the PyTorch lines round: after silu and after its product
   with up; after the norm's scaling and after its weight. x has 2k values (gate then up) with swiglu, else k. */
static void make_input(float *in, const void *x, int x_type, long k, const void *norm, int norm_type, float eps, int swiglu) {
    if (swiglu) {
        for (long i = 0; i < k; i += 8) {
            __m256 gate = load8(x, x_type, i, k - i), one = _mm256_set1_ps(1.0f);
            __m256 silu = round8(_mm256_div_ps(gate, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), gate)))), x_type);
            _mm256_storeu_ps(in + i, round8(_mm256_mul_ps(silu, load8(x, x_type, k + i, k - i)), x_type));
        }
        return;
    }
    __m256 squares = _mm256_setzero_ps();
    for (long i = 0; i < k; i += 8) {
        __m256 v = load8(x, x_type, i, k - i);
        _mm256_storeu_ps(in + i, v);
        squares = _mm256_fmadd_ps(v, v, squares);
    }
    if (!norm) return;
    __m256 scale = _mm256_set1_ps(1.0f / sqrtf(sum8(squares) / (float)k + eps));
    for (long i = 0; i < k; i += 8) {
        __m256 normed = round8(_mm256_mul_ps(_mm256_loadu_ps(in + i), scale), x_type);
        _mm256_storeu_ps(in + i, round8(_mm256_mul_ps(load8(norm, norm_type, i, k - i), normed), x_type));
    }
}

/* Several input rows (in, stride floats apart) against W (1 or 2) weight rows at w, k apart, in one pass: each eight
   weights are loaded (and converted) once and multiplied into every input row, so a weight read serves R rows. C sums
   per (weight row, input row) hide the FMA latency where W * R is small; sums[v * R + r] gets weight row v . input r.
   W, R and C are constants at every call (multi_dot), so the accumulators stay in registers. */
#define MULTI_DOT(NAME, TYPE, CODE, LOAD8, AHEAD)                                                                  \
    static inline __attribute__((always_inline)) void NAME(const TYPE *w, long k, const float *in, long stride,     \
                                                           const int W, const int R, const int C, float *sums) {   \
        __m256 a[2][4][2];                                                                                     \
        for (int v = 0; v < W; v++)                                                                            \
            for (int r = 0; r < R; r++)                                                                        \
                for (int c = 0; c < C; c++) a[v][r][c] = _mm256_setzero_ps();                                  \
        long i = 0;                                                                                            \
        for (; i + 32 <= k; i += 32) {                                                                         \
            for (int v = 0; AHEAD && v < W; v++)                                                               \
                for (int line = 0; line < 32 * (int)sizeof(TYPE); line += 64)                                  \
                    _mm_prefetch((const char *)(w + v * k + i) + AHEAD + line, _MM_HINT_T0);                   \
            for (int j = 0; j < 4; j++) {                                                                      \
                __m256 wv[2];                                                                                  \
                for (int v = 0; v < W; v++) wv[v] = LOAD8(w + v * k + i + 8 * j);                              \
                for (int r = 0; r < R; r++) {                                                                  \
                    __m256 xv = _mm256_loadu_ps(in + r * stride + i + 8 * j);                                  \
                    for (int v = 0; v < W; v++) a[v][r][j % C] = _mm256_fmadd_ps(wv[v], xv, a[v][r][j % C]);   \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (; i + 8 <= k; i += 8) {                                                                           \
            __m256 wv[2];                                                                                      \
            for (int v = 0; v < W; v++) wv[v] = LOAD8(w + v * k + i);                                          \
            for (int r = 0; r < R; r++) {                                                                      \
                __m256 xv = _mm256_loadu_ps(in + r * stride + i);                                              \
                for (int v = 0; v < W; v++) a[v][r][0] = _mm256_fmadd_ps(wv[v], xv, a[v][r][0]);               \
            }                                                                                                  \
        }                                                                                                      \
        for (int v = 0; v < W; v++)                                                                            \
            for (int r = 0; r < R; r++) {                                                                      \
                float sum = sum8(C > 1 ? _mm256_add_ps(a[v][r][0], a[v][r][1]) : a[v][r][0]);                  \
                for (long t = i; t < k; t++) sum += load_one(w, CODE, v * k + t) * in[r * stride + t];         \
                sums[v * R + r] = sum;                                                                         \
            }                                                                                                  \
    }
MULTI_DOT(multi_f32, float, F32, load8_f32, 0)
MULTI_DOT(multi_bf16, uint16_t, BF16, load8_bf16, 1024)
MULTI_DOT(multi_f16, uint16_t, F16, load8_f16, 1024)
MULTI_DOT(multi_i8, int8_t, I8, load8_i8, 1024)

/* Weight rows row .. row + W - 1 (W 1 or 2) against R (2 to 4) input rows: sums [W, R]. */
#define MULTI_CASES(FN, w)                                                                                         \
    do {                                                                                                           \
        if (W == 2 && R == 4) FN(w, k, in, stride, 2, 4, 1, sums);                                                 \
        else if (W == 2 && R == 3) FN(w, k, in, stride, 2, 3, 1, sums);                                            \
        else if (W == 2) FN(w, k, in, stride, 2, 2, 2, sums);                                                      \
        else if (R == 4) FN(w, k, in, stride, 1, 4, 2, sums);                                                      \
        else if (R == 3) FN(w, k, in, stride, 1, 3, 2, sums);                                                      \
        else FN(w, k, in, stride, 1, 2, 2, sums);                                                                  \
    } while (0)
static void multi_dot(const void *weight, int type, long row, int W, long k, const float *in, long stride, int R, float *sums) {
    switch (type) {
    case BF16: MULTI_CASES(multi_bf16, (const uint16_t *)weight + row * k); break;
    case F16: MULTI_CASES(multi_f16, (const uint16_t *)weight + row * k); break;
    case I8: MULTI_CASES(multi_i8, (const int8_t *)weight + row * k); break;
    default: MULTI_CASES(multi_f32, (const float *)weight + row * k);
    }
}

/* Output value v of weight row `row` for input row r: scaled, biased, added to the residual, stored. */
static inline void finish(float v, long row, long r, long n, const void *scale, int scale_type, const void *bias, int bias_type,
                          const void *residual, int x_type, void *out) {
    if (scale) v *= load_one(scale, scale_type, row);
    if (bias) v += load_one(bias, bias_type, row);
    if (residual) v = rounded(v, x_type) + load_one(residual, x_type, r * n + row); /* rounded first, as residual + linear(x) */
    store_one(out, x_type, r * n + row, v);
}

/* The input rows the products multiply, stride floats apart: NULL when they cannot be allocated. */
static float *inputs(const void *x, int x_type, long k, const void *norm, int norm_type, float eps, int swiglu, long rows, long stride) {
    long x_bytes = (swiglu ? 2 * k : k) * (x_type == F32 ? 4 : 2);
    float *in = aligned_alloc(32, (size_t)(rows * stride) * sizeof(float));
    for (long r = 0; in && r < rows; r++) make_input(in + r * stride, (const char *)x + r * x_bytes, x_type, k, norm, norm_type, eps, swiglu);
    return in;
}

/* qwen3gen_matvec for a weight of `count` parts stacked by rows (a layer's q, k and v, say), each rows of blocks of
   one of GGML's formats: part p is part_rows[p] rows of type types[p] at parts[p]; n, out's width, is their rows
   together. One call for the whole layer: its input made once (and its integer words once per layout), its rows
   shared out between the threads as one. */
int qwen3gen_block_matvec(const void *x, int x_type, const uint8_t *const *parts, const int *types, const long *part_rows,
                          int count, long k, const void *bias, int bias_type, const void *norm, int norm_type, float eps,
                          const void *residual, int swiglu, void *out, long rows, int threads) {
    long stride = (k + 7) / 8 * 8, n = 0, row_bytes[count], first[count + 1];
    for (int p = 0; p < count; p++) {
        first[p] = n;
        n += part_rows[p];
        row_bytes[p] = k / block_weights(types[p]) * block_bytes(types[p]);
    }
    first[count] = n;
    float *in = inputs(x, x_type, k, norm, norm_type, eps, swiglu, rows, stride);
    if (!in) return -1;
    int failed = 0;
    int float_lines = rows == 1; /* a part goes through dot_blocks, which takes the input's sums over each 16 */
#ifdef __AVX512BW__
    /* A bf16 model's decode step: make_words (fp16 keeps more bits), in two layouts, two blocks' paired (Q4_0, Q5_0)
       and a superblock's 256 (Q6_K), and make_bytes (Q4_K, Q5_K). Q8_0 goes through the float lines: its bytes cost
       no decoding. */
    int integer = rows == 1 && x_type == BF16;
    int16_t words[2][integer ? k : 1];
    int8_t halves[2][integer ? k : 1]; /* make_bytes' high and low bytes */
    float word_scales[3][integer ? k / 32 : 1], word_sums[3][integer ? k / 32 : 1];
    int layout[count], made[3] = {0, 0, 0};
    float_lines = 0;
    for (int p = 0; p < count; p++) {
        int l = layout[p] = !integer || types[p] == Q8_0 ? -1 : types[p] < Q4_K ? 0 : types[p] == Q6_K ? 1 : 2;
        if (l == 2 && !made[2]++) make_bytes(in, k, halves[0], halves[1], word_scales[2], word_sums[2]);
        if (l >= 0 && l < 2 && !made[l]++) make_words(in, k, l ? 256 : 32, !l, words[l], word_scales[l], word_sums[l]);
        float_lines |= l < 0 && rows == 1;
    }
#endif
    float sums[k / 16]; /* the formats' offsets multiply them (one input row) */
    for (long j = 0; float_lines && j < k / 16; j++)
        sums[j] = vf_sum(vf_add(vf_load(in + 16 * j), LANES == 16 ? vf_zero() : vf_load(in + 16 * j + 8)));
#pragma omp parallel num_threads(threads)
    {
        float *buffer = rows == 1 ? NULL : aligned_alloc(64, (size_t)(k + 15) / 16 * 16 * sizeof(float));
        if (rows > 1 && !buffer) failed = 1;
#pragma omp for schedule(static)
        for (long row = 0; row < n; row++) {
            int p = 0;
            while (row >= first[p + 1]) p++;
            const uint8_t *w = parts[p] + (row - first[p]) * row_bytes[p];
            if (rows == 1) {
                float v;
#ifdef __AVX512BW__
                int l = layout[p];
                if (l < 0) v = dot_blocks(w, types[p], k, in, sums);
                else if (l < 2) v = dotw_blocks(w, types[p], k, words[l], word_scales[l], word_sums[l]);
                else v = dotb_blocks(w, types[p], k, halves[0], halves[1], word_scales[2], word_sums[2]);
#else
                v = dot_blocks(w, types[p], k, in, sums);
#endif
                finish(v, row, 0, n, NULL, 0, bias, bias_type, residual, x_type, out);
                continue;
            }
            if (!buffer) continue;
            row_floats(w, types[p], k, buffer); /* the row's weights once, for every input row */
            for (long g = 0, R; g < rows; g += R) {
                R = rows - g == 5 ? 3 : rows - g < 4 ? rows - g : 4;
                float dots[4];
                multi_dot(buffer, F32, 0, 1, k, in + g * stride, stride, (int)R, dots);
                for (int r = 0; r < R; r++) finish(dots[r], row, g + r, n, NULL, 0, bias, bias_type, residual, x_type, out);
            }
        }
        free(buffer);
    }
    free(in);
    return failed ? -1 : 0;
}

/* x [rows, k] (or [rows, 2k] with swiglu), residual and out [rows, n]; W dense (float32, bf16, fp16, int8). One row:
   each weight row's dot product with the input. Several: weight rows two at a time, each pair's values multiplied into two to four input rows at once
   (multi_dot), group after group while the pair is in cache.
   Returns 0, or -1 when the input buffer cannot be allocated. */
int qwen3gen_matvec(const void *x, int x_type, const void *weight, int weight_type, long n, long k,
                    const void *scale, int scale_type, const void *bias, int bias_type, const void *norm, int norm_type,
                    float eps, const void *residual, int swiglu, void *out, long rows, int threads) {
    long stride = (k + 7) / 8 * 8;
    float *in = inputs(x, x_type, k, norm, norm_type, eps, swiglu, rows, stride);
    if (!in) return -1;
    if (rows == 1) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long row = 0; row < n; row++)
            finish(dot(weight, weight_type, row, k, in), row, 0, n, scale, scale_type, bias, bias_type, residual, x_type, out);
    } else {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long pair = 0; pair < (n + 1) / 2; pair++) {
            long row = 2 * pair;
            int W = row + 1 < n ? 2 : 1;
            for (long g = 0, R; g < rows; g += R) {
                R = rows - g == 5 ? 3 : rows - g < 4 ? rows - g : 4; /* 5 left: 3 and 2, never a group of one */
                float sums[8];
                multi_dot(weight, weight_type, row, W, k, in + g * stride, stride, (int)R, sums);
                for (int v = 0; v < W; v++)
                    for (int r = 0; r < R; r++)
                        finish(sums[v * R + r], row + v, g + r, n, scale, scale_type, bias, bias_type, residual, x_type, out);
            }
        }
    }
    free(in);
    return 0;
}

/* One head of dim values at x: RMSNorm with weight (when weight is not NULL), then rotated by the position's angles
   (split halves), rounded where the PyTorch lines round, stored to out as the activations' type. */
static void norm_rotate(const void *x, int type, long at, const void *weight, float eps, const void *cos, const void *sin,
                        long rope_at, long dim, void *out, long out_at) {
    long half = dim / 2;
    __m256 scale = _mm256_set1_ps(1.0f);
    if (weight) {
        __m256 squares = _mm256_setzero_ps();
        for (long i = 0; i < dim; i += 8) {
            __m256 v = load8(x, type, at + i, dim - i);
            squares = _mm256_fmadd_ps(v, v, squares);
        }
        scale = _mm256_set1_ps(1.0f / sqrtf(sum8(squares) / (float)dim + eps));
    }
    for (long i = 0; i < half; i += 8) {
        long count = half - i;
        __m256 first = load8(x, type, at + i, count), second = load8(x, type, at + half + i, count);
        if (weight) {
            first = round8(_mm256_mul_ps(load8(weight, type, i, count), round8(_mm256_mul_ps(first, scale), type)), type);
            second = round8(_mm256_mul_ps(load8(weight, type, half + i, count), round8(_mm256_mul_ps(second, scale), type)), type);
        }
        __m256 c = load8(cos, type, rope_at + i, count), s = load8(sin, type, rope_at + i, count);
        __m256 rotated_first = _mm256_sub_ps(round8(_mm256_mul_ps(first, c), type), round8(_mm256_mul_ps(second, s), type));
        __m256 rotated_second = _mm256_add_ps(round8(_mm256_mul_ps(second, c), type), round8(_mm256_mul_ps(first, s), type));
        store8(out, type, out_at + i, rotated_first, count);
        store8(out, type, out_at + half + i, rotated_second, count);
    }
}

/* qkv [rows, (heads + 2 kv_heads) * dim] -> q [rows, heads, dim] normed and rotated; each row's key (normed and
   rotated) and value written to the pool [num_blocks, kv_heads, block_size, dim] at its slot (block * block_size +
   offset). Every slot is checked before anything is written, so a bad one leaves the pool as it was.
   Returns 0, or -1 when a slot lies outside [0, pool_slots). */
int qwen3gen_new_token(const void *qkv, int type, long qkv_row_stride, const void *q_weight, const void *k_weight, float eps,
                       const void *cos, const void *sin, long rope_row_stride, const int64_t *slots, long pool_slots,
                       void *k_cache, void *v_cache, long kv_heads, long block_size, void *q, long rows, long heads, long dim) {
    long size = type == F32 ? 4 : 2;
    for (long r = 0; r < rows; r++)
        if (slots[r] < 0 || slots[r] >= pool_slots) return -1;
    for (long r = 0; r < rows; r++) {
        long row = r * qkv_row_stride, rope = r * rope_row_stride;
        long block = slots[r] / block_size, offset = slots[r] % block_size;
        for (long h = 0; h < heads; h++) norm_rotate(qkv, type, row + h * dim, q_weight, eps, cos, sin, rope, dim, q, (r * heads + h) * dim);
        for (long h = 0; h < kv_heads; h++) {
            long cache_at = ((block * kv_heads + h) * block_size + offset) * dim;
            norm_rotate(qkv, type, row + (heads + h) * dim, k_weight, eps, cos, sin, rope, dim, k_cache, cache_at);
            memcpy((char *)v_cache + cache_at * size, (const char *)qkv + (row + (heads + kv_heads + h) * dim) * size, dim * size);
        }
    }
    return 0;
}

#ifdef __AVX512F__
/* Each 32 values of a cache row as two vectors of 16 floats, a and b, read without a shuffle: a bf16 row's 32-bit lanes
   hold two values each, a the lane shifted left by 16 (the even values), b the lane with its low half cleared (the
   odd ones), one operation a vector; a float32 row's a and b are its first and last 16. Queries and sums are held
   split the same way (split_row, join_row), so that attention's products need no reordering until the end. */
static inline __attribute__((always_inline)) void row_halves(const char *row, long c, const int f32, __m512 *a,
                                                             __m512 *b) {
    if (f32) {
        *a = _mm512_loadu_ps((const float *)row + 32 * c), *b = _mm512_loadu_ps((const float *)row + 32 * c + 16);
        return;
    }
    __m512i lanes = _mm512_loadu_si512((const uint16_t *)row + 32 * c);
    *a = _mm512_castsi512_ps(_mm512_slli_epi32(lanes, 16));
    *b = _mm512_castsi512_ps(_mm512_and_si512(lanes, _mm512_set1_epi32((int)0xffff0000)));
}
static long split_index(long i, int f32, int second) { /* where a (second 0) or b (1) holds its value i */
    return f32 ? 32 * (i / 16) + 16 * second + i % 16 : 2 * i + second;
}
static void split_row(const float *v, long dim, int f32, float *a, float *b) {
    for (long i = 0; i < dim / 2; i++) a[i] = v[split_index(i, f32, 0)], b[i] = v[split_index(i, f32, 1)];
}
static void join_row(const float *a, const float *b, long dim, int f32, float *v) {
    for (long i = 0; i < dim / 2; i++) v[split_index(i, f32, 0)] = a[i], v[split_index(i, f32, 1)] = b[i];
}
/* For a pair of query heads (or one, the last of an odd group), each key's product with both from one read of it:
   scores[p * padded + j] = scale * (query p . key j) for count keys of `chunks` x 32 values (rows of size bytes a
   value, one after another), query p split at query + p * dim; four keys at a time, that many independent sums a
   head. */
static inline __attribute__((always_inline)) void scores_of(const char *keys, long count, const float *query,
                                                            long padded, float scale, float *scores, const int pair,
                                                            const long chunks, const int f32) {
    const long dim = 32 * chunks, half = 16 * chunks, row = dim * (f32 ? 4 : 2);
    for (long j = 0; j < count; j += 4) {
        const int n = count - j < 4 ? (int)(count - j) : 4;
        __m512 sum[2][4];
        for (int p = 0; p < pair; p++)
            for (int u = 0; u < 4; u++) sum[p][u] = _mm512_setzero_ps();
        for (long c = 0; c < chunks; c++)
            for (int u = 0; u < n; u++) {
                __m512 a, b;
                row_halves(keys + (j + u) * row, c, f32, &a, &b);
                for (int p = 0; p < pair; p++) {
                    const float *qp = query + p * dim + 16 * c;
                    sum[p][u] = _mm512_fmadd_ps(a, _mm512_loadu_ps(qp), sum[p][u]);
                    sum[p][u] = _mm512_fmadd_ps(b, _mm512_loadu_ps(qp + half), sum[p][u]);
                }
            }
        for (int p = 0; p < pair; p++)
            for (int u = 0; u < n; u++) scores[p * padded + j + u] = _mm512_reduce_add_ps(sum[p][u]) * scale;
    }
}
/* For a pair of heads (or one): sum p (split at acc + p * dim) += weights[p * padded + j] * value j for count values;
   a value whose weights are all 0 is not read. */
static inline __attribute__((always_inline)) void values_of(const char *values, long count, const float *weights,
                                                            long padded, float *acc, const int pair, const long chunks,
                                                            const int f32) {
    const long dim = 32 * chunks, half = 16 * chunks, row = dim * (f32 ? 4 : 2);
    __m512 sa[2][8], sb[2][8];
    for (int p = 0; p < pair; p++)
        for (long c = 0; c < chunks; c++) {
            sa[p][c] = _mm512_loadu_ps(acc + p * dim + 16 * c);
            sb[p][c] = _mm512_loadu_ps(acc + p * dim + half + 16 * c);
        }
    for (long j = 0; j < count; j++) {
        if (weights[j] == 0.0f && (pair == 1 || weights[padded + j] == 0.0f)) continue;
        __m512 w[2];
        for (int p = 0; p < pair; p++) w[p] = _mm512_set1_ps(weights[p * padded + j]);
        for (long c = 0; c < chunks; c++) {
            __m512 a, b;
            row_halves(values + j * row, c, f32, &a, &b);
            for (int p = 0; p < pair; p++) {
                sa[p][c] = _mm512_fmadd_ps(a, w[p], sa[p][c]);
                sb[p][c] = _mm512_fmadd_ps(b, w[p], sb[p][c]);
            }
        }
    }
    for (int p = 0; p < pair; p++)
        for (long c = 0; c < chunks; c++) {
            _mm512_storeu_ps(acc + p * dim + 16 * c, sa[p][c]);
            _mm512_storeu_ps(acc + p * dim + half + 16 * c, sb[p][c]);
        }
}
/* A row's blocks lie anywhere in the pool, where no hardware prefetcher looks: the rows of key/value head h of a block
   PREFETCHED ahead are asked for (into L2) while this one is multiplied. */
static void prefetch_block(const void *cache, long block, long kv_heads, long h, long block_size, long row_bytes) {
    const char *start = (const char *)cache + (block * kv_heads + h) * block_size * row_bytes;
    for (long line = 0; line < block_size * row_bytes; line += 64) _mm_prefetch(start + line, _MM_HINT_T1);
}
#define PREFETCHED 2 /* blocks ahead */
/* The two for float32 and bf16 heads of dim = 32 chunks: 32, 64, 128 or 256 (SPLIT_ROWS), each with its loops' bounds
   known to the compiler. */
#define SPLIT_ROWS(dim) ((dim) == 32 || (dim) == 64 || (dim) == 128 || (dim) == 256)
#define FOR_SHAPE(CALL, C) \
    (f32 ? (pair == 2 ? CALL(2, C, 1) : CALL(1, C, 1)) : (pair == 2 ? CALL(2, C, 0) : CALL(1, C, 0)))
#define BY_SHAPE(CALL) \
    switch (dim) { \
    case 32: FOR_SHAPE(CALL, 1); break; \
    case 64: FOR_SHAPE(CALL, 2); break; \
    case 128: FOR_SHAPE(CALL, 4); break; \
    default: FOR_SHAPE(CALL, 8); \
    }
static void split_scores(const char *keys, long count, long dim, int f32, const float *query, long padded, int pair,
                         float scale, float *scores) {
#define SCORES(P, C, F) scores_of(keys, count, query, padded, scale, scores, P, C, F)
    BY_SHAPE(SCORES)
#undef SCORES
}
static void split_values(const char *values, long count, long dim, int f32, const float *weights, long padded, int pair,
                         float *acc) {
#define VALUES(P, C, F) values_of(values, count, weights, padded, acc, P, C, F)
    BY_SHAPE(VALUES)
#undef VALUES
}
#endif

/* Attention of one token per row, q [rows, heads, dim], over the row's first seq_lens[row] slots of the pool
   [num_blocks, kv_heads, block_size, dim], found through its block table (row stride table_stride, max_blocks used at
   most); dim a multiple of 8. Every slot of the context is visible: the new token, already written, is the last.
   One (row, key/value head) per task: its query heads share each key and value read, and it walks its blocks in
   order, each block's keys (and values) one contiguous run of block_size * dim. Scores are scaled and exponentiated
   in float; the weights are rounded to the activations' type before the product with the values and their sum
   divides after, as in PyTorch's CPU attention. With AVX-512, float32 and bf16 heads of 32 to 256 values take
   split_scores and split_values: the cache's rows read as two vectors a 32 (row_halves), two query heads a pass,
   the blocks ahead prefetched. The lengths and block ids are checked before anything is read.
   Returns 0, -1 when out of memory, -2 for a length outside [1, max_blocks * block_size], -3 for a block id outside
   [0, num_blocks). */
int qwen3gen_decode_attention(const void *q, int type, const void *k_cache, const void *v_cache, long num_blocks,
                              long kv_heads, long block_size, const int32_t *block_tables, long table_stride,
                              long max_blocks, const int32_t *seq_lens, void *out, long rows, long heads, long dim,
                              float scale, int threads) {
    for (long b = 0; b < rows; b++) {
        long keys = seq_lens[b];
        if (keys < 1 || keys > max_blocks * block_size) return -2;
        for (long t = 0; t < (keys + block_size - 1) / block_size; t++) {
            long block = block_tables[b * table_stride + t];
            if (block < 0 || block >= num_blocks) return -3;
        }
    }
    long group = heads / kv_heads;
    int failed = 0;
#ifdef __AVX512F__ /* split: through split_scores and split_values */
    int f32 = type == F32;
    long row_bytes = dim * (f32 ? 4 : 2);
    int split = (f32 || type == BF16) && SPLIT_ROWS(dim);
#endif
#pragma omp parallel for num_threads(threads) schedule(dynamic)
    for (long task = 0; task < rows * kv_heads; task++) { /* dynamic: the rows' lengths differ, so do the tasks' costs */
        long b = task / kv_heads, h = task % kv_heads, keys = seq_lens[b], padded = (keys + 7) / 8 * 8;
        long blocks = (keys + block_size - 1) / block_size;
        const int32_t *table = block_tables + b * table_stride;
        /* per query head: its scores (keys, padded to 8), query, output and score sum as floats; one row of the cache */
        float *buffer = aligned_alloc(32, (size_t)((group * (padded + 1 + 4 * dim) + dim + 7) / 8 * 8) * sizeof(float));
        if (!buffer) {
            failed = 1;
            continue;
        }
        float *scores = buffer, *query = scores + group * padded, *acc = query + group * dim, *row = acc + group * dim;
        float *totals = row + dim;
        float *query_split = totals + group, *acc_split = query_split + group * dim; /* split_row's */
        for (long g = 0; g < group; g++)
            for (long i = 0; i < dim; i += 8) _mm256_storeu_ps(query + g * dim + i, load8(q, type, (b * heads + h * group + g) * dim + i, 8));
#ifdef __AVX512F__
        for (long g = 0; split && g < group; g++)
            split_row(query + g * dim, dim, f32, query_split + g * dim, query_split + g * dim + dim / 2);
#endif
        for (long t = 0; t < blocks; t++) {
            long first = t * block_size, count = keys - first < block_size ? keys - first : block_size;
            long base = ((long)table[t] * kv_heads + h) * block_size * dim; /* this block's keys for head h */
#ifdef __AVX512F__
            if (split && t + PREFETCHED < blocks)
                prefetch_block(k_cache, table[t + PREFETCHED], kv_heads, h, block_size, row_bytes);
            for (long g = 0; split && g < group; g += 2)
                split_scores((const char *)k_cache + base / dim * row_bytes, count, dim, f32, query_split + g * dim,
                             padded, group - g > 1 ? 2 : 1, scale, scores + g * padded + first);
            if (split) continue;
#endif
            for (long j = 0; j < count; j++) {
                for (long i = 0; i < dim; i += 8) _mm256_storeu_ps(row + i, load8(k_cache, type, base + j * dim + i, 8));
                for (long g = 0; g < group; g++) scores[g * padded + first + j] = dot_floats(query + g * dim, row, dim) * scale;
            }
        }
        for (long g = 0; g < group; g++) {
            float *s = scores + g * padded, best = -INFINITY;
            for (long j = keys; j < padded; j++) s[j] = -INFINITY;
            for (long j = 0; j < keys; j++) best = s[j] > best ? s[j] : best;
            __m256 total = _mm256_setzero_ps();
            for (long j = 0; j < padded; j += 8) {
                __m256 weight = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), _mm256_set1_ps(best)));
                total = _mm256_add_ps(total, weight);
                _mm256_storeu_ps(s + j, round8(weight, type));
            }
            totals[g] = sum8(total);
            for (long i = 0; i < dim; i++) acc[g * dim + i] = acc_split[g * dim + i] = 0.0f;
        }
        for (long t = 0; t < blocks; t++) {
            long first = t * block_size, count = keys - first < block_size ? keys - first : block_size;
            long base = ((long)table[t] * kv_heads + h) * block_size * dim;
#ifdef __AVX512F__
            if (split && t + PREFETCHED < blocks)
                prefetch_block(v_cache, table[t + PREFETCHED], kv_heads, h, block_size, row_bytes);
            for (long g = 0; split && g < group; g += 2)
                split_values((const char *)v_cache + base / dim * row_bytes, count, dim, f32,
                             scores + g * padded + first, padded, group - g > 1 ? 2 : 1, acc_split + g * dim);
            if (split) continue;
#endif
            for (long j = 0; j < count; j++) {
                int seen = 0; /* a value whose weights all underflowed to 0 adds nothing: not read */
                for (long g = 0; g < group; g++) seen |= scores[g * padded + first + j] != 0.0f;
                if (!seen) continue;
                for (long i = 0; i < dim; i += 8) _mm256_storeu_ps(row + i, load8(v_cache, type, base + j * dim + i, 8));
                for (long g = 0; g < group; g++) {
                    __m256 weight = _mm256_set1_ps(scores[g * padded + first + j]);
                    float *a = acc + g * dim;
                    for (long i = 0; i < dim; i += 8) _mm256_storeu_ps(a + i, _mm256_fmadd_ps(weight, _mm256_loadu_ps(row + i), _mm256_loadu_ps(a + i)));
                }
            }
        }
#ifdef __AVX512F__
        for (long g = 0; split && g < group; g++)
            join_row(acc_split + g * dim, acc_split + g * dim + dim / 2, dim, f32, acc + g * dim);
#endif
        for (long g = 0; g < group; g++) {
            __m256 divisor = _mm256_set1_ps(totals[g]);
            for (long i = 0; i < dim; i += 8)
                store8(out, type, (b * heads + h * group + g) * dim + i, _mm256_div_ps(_mm256_loadu_ps(acc + g * dim + i), divisor), 8);
        }
        free(buffer);
    }
    return failed ? -1 : 0;
}

/* One product of a decoder layer: a dense weight (parts NULL; qwen3gen_matvec's weight and scale) or a weight in
   GGML's blocks (qwen3gen_block_matvec's parts), with its bias; n outputs of k inputs. */
struct product {
    const void *weight;
    int weight_type;
    const void *scale;
    int scale_type;
    const uint8_t *const *parts;
    const int *types;
    const long *part_rows;
    int count;
    const void *bias;
    int bias_type;
    long n, k;
};

/* A decoder layer as model.Block.decode_one_token runs it: its norms (the activations' type), its four products,
   the q/k norms (NULL for Qwen2, which has none) and its pool. */
struct layer {
    const void *input_norm, *post_norm, *q_norm, *k_norm;
    float eps, qk_eps;
    struct product qkv, o, gate_up, down;
    void *k_cache, *v_cache;
};

/* What every layer of a decode step shares: its rows (one new token each), their angles, slots and block tables. */
struct decode_step {
    long rows, heads, kv_heads, dim, num_blocks, block_size, rope_row_stride, table_stride, max_blocks;
    const void *cos, *sin;
    const int64_t *slots;
    const int32_t *block_tables, *seq_lens;
    float scale;
};

static int product(const struct product *p, const void *x, int type, const void *norm, float eps, const void *residual,
                   int swiglu, void *out, long rows, int threads) {
    int norm_type = norm ? type : 0;
    if (p->parts)
        return qwen3gen_block_matvec(x, type, p->parts, p->types, p->part_rows, p->count, p->k, p->bias, p->bias_type,
                                     norm, norm_type, eps, residual, swiglu, out, rows, threads);
    return qwen3gen_matvec(x, type, p->weight, p->weight_type, p->n, p->k, p->scale, p->scale_type, p->bias, p->bias_type,
                           norm, norm_type, eps, residual, swiglu, out, rows, threads);
}

/* x [rows, hidden] (the activations' type) through `count` decoder layers, in place, in one call: per layer the
   norm and q/k/v product, new_token, decode_attention, o_proj with the residual, the norm and gate/up product, SwiGLU
   and down with the residual, each the function above it in this file (where a call from Python per product costs
   more than a small product does). Returns 0; -1 when a buffer cannot be allocated; decode_attention's -2 and -3;
   -4 for a slot outside the pool (new_token's -1, found before the first layer writes). */
int qwen3gen_decode_layers(void *x, int type, const struct layer *layers, int count, const struct decode_step *s,
                           int threads) {
    long size = type == F32 ? 4 : 2, rows = s->rows, width = s->heads * s->dim;
    long hidden = layers[0].o.n, qkv_n = layers[0].qkv.n, gate_up_n = layers[0].gate_up.n;
    char *qkv = malloc((size_t)(rows * qkv_n * size)), *q = malloc((size_t)(rows * width * size));
    char *att = malloc((size_t)(rows * width * size)), *h = malloc((size_t)(rows * hidden * size));
    char *gate_up = malloc((size_t)(rows * gate_up_n * size));
    int status = qkv && q && att && h && gate_up ? 0 : -1;
    for (int i = 0; i < count && status == 0; i++) {
        const struct layer *l = layers + i;
        status = product(&l->qkv, x, type, l->input_norm, l->eps, NULL, 0, qkv, rows, threads);
        if (status == 0 &&
            qwen3gen_new_token(qkv, type, qkv_n, l->q_norm, l->k_norm, l->qk_eps, s->cos, s->sin, s->rope_row_stride,
                               s->slots, s->num_blocks * s->block_size, l->k_cache, l->v_cache, s->kv_heads,
                               s->block_size, q, rows, s->heads, s->dim) != 0)
            status = -4;
        if (status == 0)
            status = qwen3gen_decode_attention(q, type, l->k_cache, l->v_cache, s->num_blocks, s->kv_heads, s->block_size,
                                               s->block_tables, s->table_stride, s->max_blocks, s->seq_lens, att, rows,
                                               s->heads, s->dim, s->scale, threads);
        if (status == 0) status = product(&l->o, att, type, NULL, 0.0f, x, 0, h, rows, threads);
        if (status == 0) status = product(&l->gate_up, h, type, l->post_norm, l->eps, NULL, 0, gate_up, rows, threads);
        if (status == 0) status = product(&l->down, gate_up, type, NULL, 0.0f, h, 1, x, rows, threads);
    }
    free(qkv);
    free(q);
    free(att);
    free(h);
    free(gate_up);
    return status;
}
