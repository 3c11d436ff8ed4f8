// Few-row CPU kernels (AVX2 + FMA; the products in AVX-512, and on AVX512-BF16/VNNI's dot
// instructions, where the CPU has them; a bf16 model's products and attention in AMX's tile unit
// where it has that) for decoding: a matrix product that streams each weight once for all rows,
// and attention of a few query rows over the KV cache.
//
// Batch invariance: every output element is computed by the same sequence of floating-point
// operations whatever the number of rows (or which tile it falls in): in a product, one FMA chain
// over the reduction dimension in a fixed order, then the bias (int8 products: an exact integer
// dot, then the scales); in attention, fixed 8-lane chains and a fixed horizontal sum; in the tile
// unit, tiles of one shape whose outputs each depend on their own row alone. So row i of a T-row
// product is bit-identical to the 1-row product of that row, which makes a T-token verify pass
// compute each token exactly as a 1-token decode step does.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <numeric>
#include <atomic>
#include <chrono>
#include <c10/util/Optional.h>
#include <cmath>
#include <functional>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

using bf16 = at::BFloat16;

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16* p) {  // bf16 -> fp32 is a 16-bit shift, exact
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#ifdef __AVX512F__
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const bf16* p) {  // bf16 -> fp32: a 16-bit shift, exact
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline void store16(__m512 v, float* p) { _mm512_storeu_ps(p, v); }
inline void store16(__m512 v, bf16* p) {  // v holds bf16 values (exact): their top halves
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
#endif
inline float to_float(float v) { return v; }
inline float to_float(bf16 v) { return static_cast<float>(v); }

// n values in fp32 (exact). 16 lanes at a time on AVX-512 builds, then 8, the last few one by one.
template <typename A>
void widen(const A* src, int64_t n, float* dst) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src + i));
  for (; i < n; ++i) dst[i] = to_float(src[i]);
}

inline float hsum(__m256 v) {  // fixed order: (lo + hi), then pairs, then the last two
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Lane-wise operations at either width the builds use (8 lanes, and 16 with AVX-512), so that one
// template computes a function at both widths with the same operations in every lane. GCC's
// vector types take + - * (not fused: the kernels build with -ffp-contract=off) and casts.
template <typename V> V splat(float v);
template <> inline __m256 splat(float v) { return _mm256_set1_ps(v); }
inline __m256 lane_min(__m256 a, __m256 b) { return _mm256_min_ps(a, b); }
inline __m256 lane_max(__m256 a, __m256 b) { return _mm256_max_ps(a, b); }
inline __m256 nearest(__m256 a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
// the lanes as 32-bit integers, unsigned (bits) and signed
template <typename V> struct Ints {
  using bits = uint32_t __attribute__((vector_size(32)));
  using ints = int32_t __attribute__((vector_size(32)));
};
#ifdef __AVX512F__
template <> inline __m512 splat(float v) { return _mm512_set1_ps(v); }
inline __m512 lane_min(__m512 a, __m512 b) { return _mm512_min_ps(a, b); }
inline __m512 lane_max(__m512 a, __m512 b) { return _mm512_max_ps(a, b); }
inline __m512 nearest(__m512 a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
template <> struct Ints<__m512> {
  using bits = uint32_t __attribute__((vector_size(64)));
  using ints = int32_t __attribute__((vector_size(64)));
};
#endif

// exp of each lane (Cephes' polynomial, ~1 ulp). Each lane is computed alone by the same ops, so a
// value's exp does not depend on its lane, its neighbours or the width (`exp1` is lane 0 of it).
template <typename V>
inline V exp_lanes(V x) {
  using U = typename Ints<V>::bits;
  x = lane_min(lane_max(x, splat<V>(-87.3f)), splat<V>(88.3f));
  const V n = nearest(x * splat<V>(1.44269504088896341f));
  x = x - n * splat<V>(0.693359375f);
  x = x - n * splat<V>(-2.12194440e-4f);
  V y = splat<V>(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = y * x + splat<V>(c);
  y = (y * x) * x + x + splat<V>(1.f);
  // 2^n from n's bits (n is a whole number in [-126, 127], so the conversion is exact)
  const U two_n = ((U)__builtin_convertvector(n, typename Ints<V>::ints) + 127u) << 23;  // vector casts keep the bits
  return y * (V)two_n;
}
inline float exp1(float x) { return _mm256_cvtss_f32(exp_lanes(_mm256_set1_ps(x))); }

// Weights are read in a packed layout (`pack`): output features in panels of 16, each stored input
// by input, so a tile streams one sequential run and multiplies each input value, broadcast, into 16
// features at once. Features past the last whole panel stay row-major. Packing reorders storage
// only: the arithmetic is the same whatever the layout.
//
// A product of bf16 weights adds its inputs in pairs, the odd one first (1, 0, 3, 2, ..., an odd
// K's last input last): the order in which AVX512-BF16's dot instruction adds a pair (two fp32
// FMAs, each product exact), so the builds with and without it give the same bits.
constexpr int64_t PANEL = 16;
constexpr int GROUP = 4;  // panels a thread takes at a time (64 features)
#ifdef __AVX512F__
constexpr bool AVX512_BUILD = true;
#else
constexpr bool AVX512_BUILD = false;
#endif
inline int64_t input_order(int64_t k, int64_t, const float*) { return k; }
inline int64_t input_order(int64_t k, int64_t K, const bf16*) { return (k ^ 1) < K ? k ^ 1 : k; }

// int8 weights (drafts) go by input quads in every build ([K/4][16][4]: a feature's weights for
// inputs 4p .. 4p + 3 in one 32-bit lane), the operand of the integer dot instructions.
template <typename W> constexpr int64_t STEP_INPUTS = 1;  // inputs per step of a panel
template <> constexpr int64_t STEP_INPUTS<int8_t> = 4;
#ifdef __AVX512F__
// AVX-512: a group's panels go in pairs, the two panels of a pair interleaved step by step
// ([K][2][16]; a last odd panel alone), the pairs one after the other. A tile over 2 panels (7 or 8
// rows) streams one sequential run, a tile over 4 two. With all 4 interleaved, 8 rows read the group
// in two passes over every other 128 bytes and streamed ~20% slower than 1 row; paired, as fast
// (2026-11-27, Zen 4, 2 threads). bf16 weights go by input pairs ([K/2][2][16][2]: a feature's
// weights for inputs 2p and 2p + 1 side by side in one 32-bit lane), the dot instruction's operand.
template <> constexpr int64_t STEP_INPUTS<bf16> = 2;
template <typename W>
inline W* panel_start(W* group, int64_t Kw, int s) {
  return group + s / 2 * 2 * PANEL * Kw + s % 2 * PANEL * STEP_INPUTS<std::remove_const_t<W>>;
}
// The distance between a panel's steps: its pair's, or its own where it is a group's last, odd one.
template <typename W>
inline int64_t panel_step(int count, int s) { return (s / 2 * 2 + 1 < count ? 2 : 1) * PANEL * STEP_INPUTS<W>; }
#else
// AVX2: each panel [K][16] on its own; in bf16 features i and 8 + i side by side (elements 2i, 2i + 1),
// so one 32-byte load widens to two fp32 vectors by a shift and a mask.
template <typename W>
inline W* panel_start(W* group, int64_t Kw, int s) { return group + s * PANEL * Kw; }
template <typename W>
inline int64_t panel_step(int, int) { return PANEL * STEP_INPUTS<W>; }
#endif
template <typename W>
inline int64_t panel_offset(int64_t k, int64_t i, int64_t step) {
  constexpr int64_t P = STEP_INPUTS<W>;
  if (P == 1 && std::is_same_v<W, bf16>) return k * step + (i < 8 ? 2 * i : 2 * (i - 8) + 1);  // AVX2 bf16
  return k / P * step + i * P + k % P;
}

// The length of a packed weight's rows: K, rounded up to whole steps (zero inputs fill the rest).
template <typename W>
inline int64_t packed_width(int64_t K) { return (K + STEP_INPUTS<W> - 1) / STEP_INPUTS<W> * STEP_INPUTS<W>; }
inline int64_t packed_width(at::ScalarType dtype, int64_t K) {
  return dtype == at::kBFloat16 ? packed_width<bf16>(K) : dtype == at::kChar ? packed_width<int8_t>(K) : K;
}

torch::Tensor pack(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && !w.requires_grad(), "pack: a contiguous [N, K] weight");
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kChar,
              "pack: fp32, bf16 or int8 weights");
  const int64_t N = w.size(0), K = w.size(1), panels = N / PANEL, full = panels * PANEL;
  torch::Tensor out;
  auto run = [&](auto* src) {
    using W = std::remove_pointer_t<decltype(src)>;
    const int64_t Kw = packed_width<W>(K);
    out = Kw == K ? torch::empty_like(w) : torch::zeros({N, Kw}, w.options());
    W* dst = out.data_ptr<W>();
    at::parallel_for(0, (panels + GROUP - 1) / GROUP, 4, [&](int64_t begin, int64_t end) {
      for (int64_t g = begin; g < end; ++g) {
        const int count = static_cast<int>(std::min<int64_t>(GROUP, panels - g * GROUP));
        for (int s = 0; s < count; ++s) {
          const W* panel = src + (g * GROUP + s) * PANEL * K;
          W* to = panel_start(dst + g * GROUP * PANEL * Kw, Kw, s);
          for (int64_t i = 0; i < PANEL; ++i)
            for (int64_t k = 0; k < K; ++k) to[panel_offset<W>(k, i, panel_step<W>(count, s))] = panel[i * K + k];
        }
      }
    });
    for (int64_t n = full; n < N; ++n) std::copy(src + n * K, src + (n + 1) * K, dst + n * Kw);
  };
  if (w.scalar_type() == at::kFloat)
    run(w.data_ptr<float>());
  else if (w.scalar_type() == at::kBFloat16)
    run(w.data_ptr<bf16>());
  else
    run(w.data_ptr<int8_t>());
  return out;
}

// One row of K values over its largest magnitude: q = v * 127 / max rounded to nearest even (the
// conversion's default mode, as std::nearbyint), in [-127, 127], into out, 8 at a time; adds the
// q's to *sum and returns the scale that takes them back (max / 127). Weights and activations
// are quantized by this one rule.
template <typename A>
inline float quantize_row(const A* row, int64_t K, int8_t* out, int32_t* sum) {
  const __m256 no_sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  __m256 top8 = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) top8 = _mm256_max_ps(top8, _mm256_and_ps(load8(row + k), no_sign));
  float lanes[8], top = 0.f;
  _mm256_storeu_ps(lanes, top8);
  for (float v : lanes) top = std::max(top, v);
  for (; k < K; ++k) top = std::max(top, std::fabs(to_float(row[k])));
  const float inv = top > 0.f ? 127.f / top : 0.f;
  __m256i sum8 = _mm256_setzero_si256();
  for (k = 0; k + 8 <= K; k += 8) {
    const __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(load8(row + k), _mm256_set1_ps(inv)));
    sum8 = _mm256_add_epi32(sum8, q);
    const __m128i q16 = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(out + k), _mm_packs_epi16(q16, q16));
  }
  int32_t sums[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(sums), sum8);
  for (int32_t v : sums) *sum += v;
  for (; k < K; ++k) {
    const int32_t q = static_cast<int32_t>(std::nearbyint(to_float(row[k]) * inv));
    *sum += q;
    out[k] = static_cast<int8_t>(q);
  }
  return top / 127.f;
}

// int8 weights for drafting: each output feature's weights over their largest magnitude (x 127,
// rounded to q in [-127, 127]), and the scale that takes them back. Stored as q + 128 (an unsigned
// byte, the operand VNNI's dot takes unsigned). Returns the packed weight and the fp32 scales [N].
std::vector<torch::Tensor> quantize(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "quantize: a weight [N, K]");
  const auto wf = w.detach().to(at::kFloat).contiguous();
  const int64_t N = wf.size(0), K = wf.size(1);
  auto q = torch::empty({N, K}, wf.options().dtype(at::kChar));
  auto scale = torch::empty({N}, wf.options());
  const float* src = wf.data_ptr<float>();
  int8_t* dst = q.data_ptr<int8_t>();
  float* sp = scale.data_ptr<float>();
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      int32_t sum = 0;  // not needed for weights
      sp[n] = quantize_row(src + n * K, K, dst + n * K, &sum);
      for (int64_t k = 0; k < K; ++k) dst[n * K + k] ^= static_cast<int8_t>(0x80);  // q + 128 as an unsigned byte
    }
  });
  return {pack(q), scale};
}

// Where a panel's 16 outputs go: y (rows ldy apart), after the int8 weights' scales and the bias, where given.
struct PanelOut {
  const float* scale;
  const float* bias;
  float* y;
};

// 16 values as two fp32 vectors: fp32 ones as stored (0-7, then 8-15); bf16 ones as the even, then
// the odd, elements of their 32-bit pairs (a 16-bit shift and a mask: exact). A panel stores the
// weights of one input so (bf16: features 0-7 in the even halves, 8-15 in the odd ones), and the
// pair-order attention scores read 16 dimensions of a key so.
inline void load16(const float* p, __m256& lo, __m256& hi) {
  lo = _mm256_loadu_ps(p);
  hi = _mm256_loadu_ps(p + 8);
}
inline void load16(const bf16* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}

constexpr int64_t PREFETCH_BYTES = 8192;  // how far ahead the tiles ask for weights
// into L2, not L1: the tiles of a few rows stream faster so (2026-11-26, Zen 4: AVX2 4- and 8-token
// verify 0.90x, AVX-512 draft 0.92x and AR step 0.93x against L1; `benchmarks/kernel_ab.py`)
inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1); }
#ifdef __AVX512F__
// Ask for step k of a tile's S panels: one run a pair of panels (a step of one panel is a cache line).
template <int S, typename W>
inline void prefetch_step(const W* const* w, int64_t k, int64_t step) {
  for (int s = 0; s < S; s += 2) {
    const char* run = reinterpret_cast<const char*>(w[s] + k * step);
    for (int64_t b = 0; b < std::min(S - s, 2) * PANEL * STEP_INPUTS<W> * static_cast<int64_t>(sizeof(W)); b += 64)
      prefetch(run + b);
  }
}
#endif

// y_s[r, f] = x[r] . w_s[f] (+ bias_s[f]) for R rows of x (ldx apart) and the 16 features of each
// of S panels: every output is one FMA chain over the inputs in `input_order`, from zero, then the
// bias. No tile shape changes what an output is computed from or in which order, so any row count
// gives every row the same bits.
#ifdef __AVX512F__
// The AVX-512 build (chosen at load time on CPUs that have it): a panel's 16 features fill one
// 16-lane register, so with 32 registers a tile covers up to 6 rows over a whole group of 4 panels
// and each weight is read once for them.
// Tiles ask for the weights 8 KB ahead of the ones they multiply in each run (past a weight's end
// too: prefetches do not fault): this keeps enough reads in flight to stream faster (the model's
// bf16 products ~10% faster at 1 row, ~18% at 4 and 8).
// X is float (x in fp32), or, for bf16 weights on a CPU with AVX512-BF16, uint32_t: x's bf16 pairs
// (`bf16_pairs`), multiplied by the dot instruction, 32 products an instruction instead of 16.

template <typename X, typename W, int R, int S>
inline void linear_tile(const X* x, int64_t ldx, int64_t K, const W* const* w, int64_t step, const PanelOut* out,
                        int64_t ldy) {
  __m512 acc[R][S] = {};
  constexpr int64_t P = STEP_INPUTS<W>;
  const int64_t steps = (K + P - 1) / P, ahead = PREFETCH_BYTES / (step * static_cast<int64_t>(sizeof(W)));
  for (int64_t k = 0; k < steps; ++k) {
    prefetch_step<S>(w, k + ahead, step);
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      if constexpr (std::is_same_v<W, float>) {
        const __m512 ws = _mm512_loadu_ps(w[s] + k * step);
#pragma GCC unroll 12
        for (int r = 0; r < R; ++r) acc[r][s] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + k]), ws, acc[r][s]);
      } else {
        const __m512i ws = _mm512_loadu_si512(w[s] + k * step);
        if constexpr (std::is_same_v<X, uint32_t>) {
#ifdef __AVX512BF16__
#pragma GCC unroll 12
          for (int r = 0; r < R; ++r)
            acc[r][s] = _mm512_dpbf16_ps(acc[r][s], (__m512bh)ws, (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * ldx + k])));
#endif
        } else {  // fp32 x: each pair widened (exactly) and added odd input first, as the dot instruction does
          const __m512 odd = _mm512_castsi512_ps(_mm512_and_si512(ws, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
          const __m512 even = _mm512_castsi512_ps(_mm512_slli_epi32(ws, 16));
#pragma GCC unroll 12
          for (int r = 0; r < R; ++r) {
            if (2 * k + 1 < K) acc[r][s] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + 2 * k + 1]), odd, acc[r][s]);
            acc[r][s] = _mm512_fmadd_ps(_mm512_set1_ps(x[r * ldx + 2 * k]), even, acc[r][s]);
          }
        }
      }
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      __m512 v = acc[r][s];
      if (out[s].bias) v = _mm512_add_ps(v, _mm512_loadu_ps(out[s].bias));
      _mm512_storeu_ps(out[s].y + r * ldy, v);
    }
}

#else
// A tile has R x S x 2 chains in flight (`linear_rows` picks the shapes). Inputs go two
// at a time in `input_order` (the pair's odd input first for bf16), asking for the weights
// PREFETCH_BYTES ahead as the AVX-512 tiles do (a 4-token bf16 pass 0.81x).
// `tile_span` adds inputs [k0, k1) (k0 even; k1 even or K) to the R x 2S sums in `sums`, so a tile
// can walk K in pieces and its chains stay the ones one walk over K runs.
template <typename X, typename W, int R, int S>
inline void tile_span(const X* x, int64_t ldx, int64_t k0, int64_t k1, int64_t K, const W* const* w, int64_t step,
                      __m256* sums) {
  __m256 acc[R][2 * S];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * S; ++c) acc[r][c] = sums[r * 2 * S + c];
  const float* xr[R];
  for (int r = 0; r < R; ++r) xr[r] = x + r * ldx;
  auto input = [&](int64_t k) {
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      __m256 lo, hi;
      load16(w[s] + k * step, lo, hi);
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const __m256 xk = _mm256_broadcast_ss(xr[r] + k);
        acc[r][2 * s] = _mm256_fmadd_ps(xk, lo, acc[r][2 * s]);
        acc[r][2 * s + 1] = _mm256_fmadd_ps(xk, hi, acc[r][2 * s + 1]);
      }
    }
  };
  const int64_t ahead = PREFETCH_BYTES / (step * static_cast<int64_t>(sizeof(W)));
  constexpr int64_t PAIR_BYTES = 2 * PANEL * sizeof(W);  // two inputs of a panel: one cache line (bf16) or two
  constexpr int64_t FIRST = std::is_same_v<W, bf16>;  // a whole pair in `input_order`: bf16's odd input first
  int64_t n = k0;
  for (; n + 2 <= k1; n += 2) {
    for (int s = 0; s < S; ++s)
      for (int64_t b = 0; b < PAIR_BYTES; b += 64) prefetch(reinterpret_cast<const char*>(w[s] + (n + ahead) * step) + b);
    input(n + FIRST);
    input(n + 1 - FIRST);
  }
  if (n < k1) input(input_order(n, K, w[0]));
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < 2 * S; ++c) sums[r * 2 * S + c] = acc[r][c];
}

// A tile's sums (R x 2S, as `tile_span` leaves them) to y, after the bias.
template <int R, int S>
inline void tile_store(const __m256* sums, const PanelOut* out, int64_t ldy) {
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      __m256 lo = sums[r * 2 * S + 2 * s], hi = sums[r * 2 * S + 2 * s + 1];
      if (const float* b = out[s].bias) lo = _mm256_add_ps(lo, _mm256_loadu_ps(b)), hi = _mm256_add_ps(hi, _mm256_loadu_ps(b + 8));
      _mm256_storeu_ps(out[s].y + r * ldy, lo);
      _mm256_storeu_ps(out[s].y + r * ldy + 8, hi);
    }
}

template <typename X, typename W, int R, int S>
inline void linear_tile(const X* x, int64_t ldx, int64_t K, const W* const* w, int64_t step, const PanelOut* out,
                        int64_t ldy) {
  __m256 sums[R * 2 * S];
  for (auto& v : sums) v = _mm256_setzero_ps();
  tile_span<X, W, R, S>(x, ldx, 0, K, K, w, step, sums);
  tile_store<R, S>(sums, out, ldy);
}

#endif

// int8 products (drafts): x's rows quantized like the weights (`int8_quads`), the dot of each row
// with each feature's weights an exact integer sum, then (float(dot) * x's scale) * the weight's
// scale (+ bias). Integer sums do not depend on order, so every build and tile gives the same bits.
// x: per row `steps` words of 4 int8 inputs, then the row's scale (fp32 bits) and the sum of its
// quantized inputs (weights are stored + 128 for VNNI, whose dot takes one operand unsigned); for
// 4-bit weights then the sums of each group's quantized inputs (fp32 bits).
inline float word_float(const uint32_t* p) {
  float v;
  std::memcpy(&v, p, 4);
  return v;
}
inline float row_scale(const uint32_t* row, int64_t steps) { return word_float(row + steps); }
inline int32_t row_sum(const uint32_t* row, int64_t steps) { return static_cast<int32_t>(row[steps + 1]); }
inline float group_sum(const uint32_t* row, int64_t steps, int64_t g) { return word_float(row + steps + 2 + g); }

#ifdef __AVX512VNNI__
// VNNI: one instruction multiplies a word of 4 unsigned weight bytes by 4 signed inputs and adds the
// four products to a 32-bit lane: 64 products an instruction, so a few rows cost what one does.
template <int R, int S>
inline void int8_tile(const uint32_t* x, int64_t ldx, int64_t steps, const int8_t* const* w, int64_t step,
                      const PanelOut* out, int64_t ldy) {
  __m512i acc[R][S] = {};
  const int64_t ahead = PREFETCH_BYTES / step;
  for (int64_t k = 0; k < steps; ++k) {
    prefetch_step<S>(w, k + ahead, step);
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      const __m512i ws = _mm512_loadu_si512(w[s] + k * step);
#pragma GCC unroll 12
      for (int r = 0; r < R; ++r)
        acc[r][s] = _mm512_dpbusd_epi32(acc[r][s], ws, _mm512_set1_epi32(static_cast<int>(x[r * ldx + k])));
    }
  }
#pragma GCC unroll 12
  for (int r = 0; r < R; ++r) {
    const __m512i offset = _mm512_set1_epi32(128 * row_sum(x + r * ldx, steps));  // the + 128, taken back
    const __m512 scale = _mm512_set1_ps(row_scale(x + r * ldx, steps));
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][s], offset)), scale);
      v = _mm512_mul_ps(v, _mm512_loadu_ps(out[s].scale));
      if (out[s].bias) v = _mm512_add_ps(v, _mm512_loadu_ps(out[s].bias));
      _mm512_storeu_ps(out[s].y + r * ldy, v);
    }
  }
}
#else
// Without VNNI (AVX2): |x| times the weight with x's sign, 2 products a 16-bit lane (at most
// 2 * 127 * 127: no saturation), then pairs of lanes into 32 bits.
template <int R, int S>
inline void int8_tile(const uint32_t* x, int64_t ldx, int64_t steps, const int8_t* const* w, int64_t step,
                      const PanelOut* out, int64_t ldy) {
  __m256i acc[R][2 * S] = {};
  const __m256i unsigned_to_signed = _mm256_set1_epi8(static_cast<char>(0x80)), ones = _mm256_set1_epi16(1);
  const int64_t ahead = PREFETCH_BYTES / step;  // a step of a panel is one cache line
  for (int64_t k = 0; k < steps; ++k) {
    for (int s = 0; s < S; ++s) prefetch(w[s] + (k + ahead) * step);
    __m256i xs[R], xa[R];
    for (int r = 0; r < R; ++r) {
      xs[r] = _mm256_set1_epi32(static_cast<int>(x[r * ldx + k]));
      xa[r] = _mm256_abs_epi8(xs[r]);
    }
    for (int s = 0; s < S; ++s)
      for (int h = 0; h < 2; ++h) {
        const __m256i q = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[s] + k * step + 32 * h)),
                                           unsigned_to_signed);
        for (int r = 0; r < R; ++r)
          acc[r][2 * s + h] = _mm256_add_epi32(
              acc[r][2 * s + h], _mm256_madd_epi16(_mm256_maddubs_epi16(xa[r], _mm256_sign_epi8(q, xs[r])), ones));
      }
  }
  for (int r = 0; r < R; ++r) {
    const __m256 scale = _mm256_set1_ps(row_scale(x + r * ldx, steps));
    for (int s = 0; s < S; ++s)
      for (int h = 0; h < 2; ++h) {
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[r][2 * s + h]), scale);
        v = _mm256_mul_ps(v, _mm256_loadu_ps(out[s].scale + 8 * h));
        if (out[s].bias) v = _mm256_add_ps(v, _mm256_loadu_ps(out[s].bias + 8 * h));
        _mm256_storeu_ps(out[s].y + r * ldy + 8 * h, v);
      }
  }
}
#endif

// A feature past the last whole panel (row-major, + 128): the same integer dot and epilogue.
inline void int8_feature(const uint32_t* x, int64_t ldx, int64_t M, int64_t K, const int8_t* w, float scale,
                         const float* bias, float* y, int64_t ldy) {
  const int64_t steps = (K + 3) / 4;
  for (int64_t r = 0; r < M; ++r) {
    const auto* xq = reinterpret_cast<const int8_t*>(x + r * ldx);
    int32_t dot = 0;
    // q = the stored byte with its top bit flipped (- 128); written as (uint8 - 128) * int8, GCC 12
    // vectorizes this loop with VNNI wrongly (K = 33: a wrong sum)
    for (int64_t k = 0; k < K; ++k) dot += static_cast<int32_t>(static_cast<int8_t>(w[k] ^ 0x80)) * xq[k];
    const float v = static_cast<float>(dot) * row_scale(x + r * ldx, steps) * scale;
    y[r * ldy] = bias ? v + *bias : v;
  }
}

// R rows over `count` panels, S at a time (the last few one by one; on AVX-512 builds, where a
// thread may take half a group (`for_each_panel_run`), two at a time first). The AVX2 build without that
// step: with it, its fp32 16-token pass measured 1.13x, though the step never runs there.
template <typename X, typename W, int R, int S>
inline void linear_panels(const X* x, int64_t ldx, int64_t K, const W* const* w, const PanelOut* out, int64_t ldy,
                          int count) {
  constexpr bool PAIRS = S > 2 && AVX512_BUILD;
  int s = 0;
  if constexpr (std::is_same_v<W, int8_t>) {
    for (; s + S <= count; s += S) int8_tile<R, S>(x, ldx, (K + 3) / 4, w + s, panel_step<W>(count, s), out + s, ldy);
    if constexpr (PAIRS)
      for (; s + 2 <= count; s += 2) int8_tile<R, 2>(x, ldx, (K + 3) / 4, w + s, panel_step<W>(count, s), out + s, ldy);
    for (; s < count; ++s) int8_tile<R, 1>(x, ldx, (K + 3) / 4, w + s, panel_step<W>(count, s), out + s, ldy);
  } else {
    for (; s + S <= count; s += S) linear_tile<X, W, R, S>(x, ldx, K, w + s, panel_step<W>(count, s), out + s, ldy);
    if constexpr (PAIRS)
      for (; s + 2 <= count; s += 2) linear_tile<X, W, R, 2>(x, ldx, K, w + s, panel_step<W>(count, s), out + s, ldy);
    for (; s < count; ++s) linear_tile<X, W, R, 1>(x, ldx, K, w + s, panel_step<W>(count, s), out + s, ldy);
  }
}

// Features past the last whole panel (row-major): the same chain per output, one lane at a time.
template <typename W>
void linear_feature(const float* x, int64_t M, int64_t K, const W* w, const float* bias, float* y, int64_t ldy) {
  for (int64_t r = 0; r < M; ++r) {
    float s = 0.f;
    for (int64_t n = 0; n < K; ++n) {
      const int64_t k = input_order(n, K, w);
      s = std::fma(x[r * K + k], to_float(w[k]), s);
    }
    y[r * ldy] = bias ? s + *bias : s;
  }
}

// What a product's caller does with outputs as soon as they are computed, by the thread that computed
// them, while they are in its cache (SiLU * up after gate/up, the residual add after o and down):
// after(j, n0, n1) once weight j's features [n0, n1) are done for every row; each feature is in one
// call. A thread's calls cover whole runs of panels (`for_each_panel_run`), and the features past the
// last whole panel come last, in one call after every thread is done.
using Epilogue = std::function<void(size_t j, int64_t n0, int64_t n1)>;

// Several weights that read the same x (q, k, v; gate, up) in one call: their panels, in groups of
// GROUP, form one range that the threads split, so each weight is read by one thread, once. The
// tiles read x as X (ldx apart), the features past the last panel read it in fp32 (xf).
template <typename X, typename W>
struct Products {
  const X* x;
  int64_t ldx;
  const float* xf;
  int64_t M, K;
  std::vector<const W*> w;
  std::vector<int64_t> N;
  std::vector<const float*> scale, bias;
  std::vector<float*> y;
  const Epilogue* after;
};

// Each thread walks its own contiguous share of the chunks front to back (one long run for the
// prefetchers); a thread done with its share takes chunks from the back of another's, so a thread
// that starts late (woken late, or its core briefly taken) does less and no thread waits on it long.
template <typename F>
void parallel_chunks(int64_t total, int64_t chunk, const F& body) {
  const int64_t chunks = (total + chunk - 1) / chunk;
  const int threads = static_cast<int>(std::min<int64_t>(at::get_num_threads(), chunks));
  if (threads <= 1 || at::in_parallel_region()) {
    body(0, total);
    return;
  }
  // a share's unclaimed chunks [front, back) in one word: its owner and a thief claim by one CAS
  auto share = [](int64_t front, int64_t back) { return static_cast<uint64_t>(front) << 32 | static_cast<uint64_t>(back); };
  std::vector<std::atomic<uint64_t>> shares(threads);
  for (int t = 0; t < threads; ++t) shares[t] = share(chunks * t / threads, chunks * (t + 1) / threads);
  auto claim = [&](int t, bool front) -> int64_t {  // a chunk of share t (its first or last), or -1
    uint64_t s = shares[t].load();
    for (;;) {
      const int64_t f = static_cast<int64_t>(s >> 32), b = static_cast<int64_t>(s & 0xFFFFFFFFu);
      if (f >= b) return -1;
      if (shares[t].compare_exchange_weak(s, front ? share(f + 1, b) : share(f, b - 1))) return front ? f : b - 1;
    }
  };
  auto run = [&](int64_t c) { body(c * chunk, std::min(total, (c + 1) * chunk)); };
#pragma omp parallel num_threads(threads)
  {
    const int t = omp_get_thread_num();
    for (int64_t c; (c = claim(t, true)) >= 0;) run(c);
    for (int v = 1; v < threads; ++v)
      for (int64_t c; (c = claim((t + v) % threads, false)) >= 0;) run(c);
  }
}

// R rows over the group, the AVX2 way (see `linear_rows` there): its first tile streams the weights
// one panel at a time, a later one reads them from cache CACHED_S panels at a time.
template <typename X, typename W, int R, int CACHED_S>
inline void streamed_panels(bool cached, const X* x, int64_t ldx, int64_t K, const W* const* w, const PanelOut* out,
                            int64_t ldy, int count) {
  if (cached)
    linear_panels<X, W, R, CACHED_S>(x, ldx, K, w, out, ldy, count);
  else
    linear_panels<X, W, R, 1>(x, ldx, K, w, out, ldy, count);
}

#ifdef __AMX_BF16__
// The AMX build: a bf16 product's tile is a matrix multiply of up to 16 rows by a group's panels in
// the CPU's tile unit, which keeps pace with the memory for any row count (SmolLM2's products from
// 1 to 16 rows: +1.9 ms a pass, against +13.9 ms on the dot instruction; `pass_phases.py`, 2 threads,
// 2026-11-28, Intel Xeon). A tile multiplies 32 inputs at a time and sums its products in an order of its own
// (not the dot instruction's pair chain), so this build's bf16 products differ from the other
// builds' in the last bits; each output is still computed from its own row alone by one fixed
// sequence of tile ops, whatever the row count, so every row count gives every row the same bits.
constexpr int64_t AMX_ROWS = 16, AMX_INPUTS = 32;

// The tile registers: sums 0-3 (one a panel, rows x 16 fp32), x's 32 inputs (rows x 64 bytes), and
// two of weights (16 input pairs x 16 features). Loaded on every call: torch's own AMX products may
// have set other shapes on this thread since.
inline void configure_tiles(int rows) {
  struct alignas(64) {
    uint8_t palette = 1, start_row = 0, reserved[14] = {};
    uint16_t bytes_per_row[16] = {};
    uint8_t rows[16] = {};
  } config;
  for (int t = 0; t < 5; ++t) config.rows[t] = static_cast<uint8_t>(rows), config.bytes_per_row[t] = 64;
  for (int t = 5; t < 7; ++t) config.rows[t] = 16, config.bytes_per_row[t] = 64;
  _tile_loadconfig(&config);
}

// rows (<= 16) of x's bf16 pairs (ldx words apart) by S panels: every 32 inputs one tile of x and
// one of each panel's weights (their 16 pairs `step` elements apart), then the bias.
template <int S>
void amx_tile(const uint32_t* x, int64_t ldx, int64_t K, const bf16* const* w, const int64_t* step, const PanelOut* out,
              int64_t ldy, int rows) {
  configure_tiles(rows);
  _tile_zero(0);
  if constexpr (S > 1) _tile_zero(1);
  if constexpr (S > 2) _tile_zero(2);
  if constexpr (S > 3) _tile_zero(3);
  for (int64_t p = 0; p < K / 2; p += AMX_INPUTS / 2) {
    _tile_loadd(4, x + p, ldx * 4);
    _tile_loadd(5, w[0] + p * step[0], step[0] * 2);
    _tile_dpbf16ps(0, 4, 5);
    if constexpr (S > 1) {
      _tile_loadd(6, w[1] + p * step[1], step[1] * 2);
      _tile_dpbf16ps(1, 4, 6);
    }
    if constexpr (S > 2) {
      _tile_loadd(5, w[2] + p * step[2], step[2] * 2);
      _tile_dpbf16ps(2, 4, 5);
    }
    if constexpr (S > 3) {
      _tile_loadd(6, w[3] + p * step[3], step[3] * 2);
      _tile_dpbf16ps(3, 4, 6);
    }
  }
  _tile_stored(0, out[0].y, ldy * 4);
  if constexpr (S > 1) _tile_stored(1, out[1].y, ldy * 4);
  if constexpr (S > 2) _tile_stored(2, out[2].y, ldy * 4);
  if constexpr (S > 3) _tile_stored(3, out[3].y, ldy * 4);
  for (int s = 0; s < S; ++s)
    if (const float* b = out[s].bias)
      for (int r = 0; r < rows; ++r) store16(_mm512_add_ps(load16(out[s].y + r * ldy), load16(b)), out[s].y + r * ldy);
}

int64_t amx_rows(const uint32_t* x, int64_t ldx, int64_t K, const bf16* const* w, const PanelOut* out, int64_t ldy,
                 int count, int64_t rest) {
  const int rows = static_cast<int>(std::min(rest, AMX_ROWS));
  int64_t step[GROUP];
  for (int s = 0; s < count; ++s) step[s] = panel_step<bf16>(count, s);
  switch (count) {
    case 1: amx_tile<1>(x, ldx, K, w, step, out, ldy, rows); break;
    case 2: amx_tile<2>(x, ldx, K, w, step, out, ldy, rows); break;
    case 3: amx_tile<3>(x, ldx, K, w, step, out, ldy, rows); break;
    default: amx_tile<4>(x, ldx, K, w, step, out, ldy, rows); break;
  }
  return rows;
}
#endif

// One pass over a group of up to GROUP panels (64 features) for the next of its `rest` rows; returns
// how many rows it took.
#ifdef __AVX512F__
// 1 or 2 rows over the group's 4 panels at once (4 or 8 chains); 3 to 8 rows over 2 panels at a
// time (6 to 16 chains), one sequential run a tile (a 4-, 5- or 6-token bf16 pass 0.93-0.94x against
// 4 panels at once, 3 tokens 0.95x, fp32 4 tokens 0.975x, 2026-11-27, Zen 5; 7 and 8 rows so in one
// pass over the group rather than two: an 8-token bf16 pass 0.88x, 7 tokens 0.93x, 2026-11-26); 9 to
// 16 rows in two passes of half each (one 12-row pass over 2 panels at a time was slower: 14.5 ms of
// products against 10.7; 16 rows as 8 + 8 rather than 6 + 6 + 4: a 16-token bf16 pass 0.955x, fp32
// 0.979x, 2026-11-27), more rows 8 at a time (a 64-token prefill pass 0.979x, 32 tokens 0.953x
// against 6 at a time).
template <typename X, typename W>
int64_t linear_rows(const X* x, int64_t ldx, int64_t K, const W* const* w, const PanelOut* out,
                    int64_t ldy, int count, int64_t rest, bool /* cached: the same tiles either way */) {
#ifdef __AMX_BF16__
  if constexpr (std::is_same_v<X, uint32_t> && std::is_same_v<W, bf16>)
    if (K % AMX_INPUTS == 0) return amx_rows(x, ldx, K, w, out, ldy, count, rest);
#endif
  const int64_t rows = rest <= 8 ? rest : rest <= 16 ? (rest + 1) / 2 : 8;
  switch (rows) {
    case 1: linear_panels<X, W, 1, GROUP>(x, ldx, K, w, out, ldy, count); break;
    case 2: linear_panels<X, W, 2, GROUP>(x, ldx, K, w, out, ldy, count); break;
    case 3: linear_panels<X, W, 3, 2>(x, ldx, K, w, out, ldy, count); break;
    case 4: linear_panels<X, W, 4, 2>(x, ldx, K, w, out, ldy, count); break;
    case 5: linear_panels<X, W, 5, 2>(x, ldx, K, w, out, ldy, count); break;
    case 6: linear_panels<X, W, 6, 2>(x, ldx, K, w, out, ldy, count); break;
    case 7: linear_panels<X, W, 7, 2>(x, ldx, K, w, out, ldy, count); break;
    default: linear_panels<X, W, 8, 2>(x, ldx, K, w, out, ldy, count); break;
  }
  return rows;
}
#else
// A group's first tile streams its weights from memory one panel at a time: one sequential run,
// which the prefetchers keep ahead of best (1 row of bf16 weights with K = 576 streamed at 55 GB/s
// so, against 38 GB/s over 4 panels at once; a 3-row tile at 50 against 25 over 2 panels). bf16
// tiles take at most 5 rows: at 6, the 12 sums, the two halves and the widening mask leave no
// register for x, and the tile spills (5 rows 235 GFLOP/s from cache, 6 rows 175).
// `benchmarks/avx2_tiles.cpp`, 2026-11-27, Zen 5.
template <typename W>
constexpr int64_t WIDEST_TILE = std::is_same_v<W, bf16> ? 5 : 6;
constexpr int64_t SPAN_INPUTS = 128;  // inputs of a panel the tiles of a group take in turn (8 KB of fp32 weights)
constexpr int SPAN_TILES = 3;  // tiles walking a panel together (more rows are bound by arithmetic: no gain)

template <typename X, typename W>
inline void span_tile(int64_t rows, const X* x, int64_t ldx, int64_t k0, int64_t k1, int64_t K, const W* const* w,
                      __m256* sums) {
  constexpr int64_t step = PANEL * STEP_INPUTS<W>;
  switch (rows) {
    case 4: tile_span<X, W, 4, 1>(x, ldx, k0, k1, K, w, step, sums); break;
    case 5: tile_span<X, W, 5, 1>(x, ldx, k0, k1, K, w, step, sums); break;
    default: if constexpr (WIDEST_TILE<W> == 6) tile_span<X, W, 6, 1>(x, ldx, k0, k1, K, w, step, sums); break;
  }
}

// More rows than one tile takes: up to SPAN_TILES tiles of WIDEST_TILE rows (and one of 4 or more
// rows left) walk each panel together, SPAN_INPUTS inputs at a time. The panel streams from memory
// once, in one run, and every tile multiplies each piece while it is in L1, so the memory keeps
// streaming while the tiles after the first compute (when each tile walked the whole group in
// turn, the later ones read it from L2 and the memory sat idle meanwhile): fp32 8 / 12 / 16 tokens
// 0.91x / 0.94x / 0.93-0.95x, bf16 8 / 16 tokens 0.98x (`kernel_ab.py`, 2026-11-27, Zen 5). A tile's
// sums wait in `sums` between pieces; their chains are the ones one walk over K runs.
template <typename X, typename W>
int64_t tiles_in_step(const X* x, int64_t ldx, int64_t K, const W* const* w, const PanelOut* out, int64_t ldy,
                      int count, int64_t rest) {
  constexpr int64_t WIDEST = WIDEST_TILE<W>;
  // tiles of WIDEST rows and one of the rest if it has 4 or more (8 chains: fewer wait on the FMAs'
  // latency); fewer rows left over run after, over the group in L2, as `linear_rows` takes them
  const int64_t whole = std::min<int64_t>(SPAN_TILES, rest / WIDEST), left = rest - whole * WIDEST;
  const int tiles = static_cast<int>(whole) + (whole < SPAN_TILES && left >= 4);
  const int64_t rows = std::min(rest, tiles * WIDEST);
  int64_t first[SPAN_TILES + 1];
  for (int t = 0; t <= tiles; ++t) first[t] = std::min(rows, t * WIDEST);
  alignas(32) __m256 sums[SPAN_TILES][2 * WIDEST];
  for (int s = 0; s < count; ++s) {
    for (auto& tile : sums)
      for (auto& v : tile) v = _mm256_setzero_ps();
    for (int64_t k0 = 0; k0 < K; k0 += SPAN_INPUTS)
      for (int t = 0; t < tiles; ++t)
        span_tile(first[t + 1] - first[t], x + first[t] * ldx, ldx, k0, std::min(K, k0 + SPAN_INPUTS), K, w + s, sums[t]);
    for (int t = 0; t < tiles; ++t) {
      const PanelOut o = {out[s].scale, out[s].bias, out[s].y + first[t] * ldy};
      switch (first[t + 1] - first[t]) {
        case 4: tile_store<4, 1>(sums[t], &o, ldy); break;
        case 5: tile_store<5, 1>(sums[t], &o, ldy); break;
        default: if constexpr (WIDEST == 6) tile_store<6, 1>(sums[t], &o, ldy); break;
      }
    }
  }
  return rows;
}

template <typename X, typename W>
int64_t linear_rows(const X* x, int64_t ldx, int64_t K, const W* const* w, const PanelOut* out,
                    int64_t ldy, int count, int64_t rest, bool cached) {
  switch (rest) {
    case 1: streamed_panels<X, W, 1, GROUP>(cached, x, ldx, K, w, out, ldy, count); return 1;
    case 2: streamed_panels<X, W, 2, 2>(cached, x, ldx, K, w, out, ldy, count); return 2;
    case 3: linear_panels<X, W, 3, 1>(x, ldx, K, w, out, ldy, count); return 3;
    case 4: linear_panels<X, W, 4, 1>(x, ldx, K, w, out, ldy, count); return 4;
    case 5: linear_panels<X, W, 5, 1>(x, ldx, K, w, out, ldy, count); return 5;
  }
  if constexpr (WIDEST_TILE<W> == 6)
    if (rest == 6) return linear_panels<X, W, 6, 1>(x, ldx, K, w, out, ldy, count), 6;
  return tiles_in_step(x, ldx, K, w, out, ldy, count, rest);
}
#endif

#ifndef __AVX512VNNI__
// int8 products without VNNI (AVX2, or AVX-512 without it) run 256-bit integer tiles of 2 rows or
// 1; a group's first tile over one panel at a time, as `linear_rows` streams, later ones over 2 or 4
// (8 sums in registers).
template <typename X>
int64_t int8_rows(const X* x, int64_t ldx, int64_t K, const int8_t* const* w, const PanelOut* out, int64_t ldy,
                  int count, int64_t rest, bool cached) {
  if (rest >= 2) return streamed_panels<X, int8_t, 2, 2>(cached, x, ldx, K, w, out, ldy, count), 2;
  return streamed_panels<X, int8_t, 1, GROUP>(cached, x, ldx, K, w, out, ldy, count), 1;
}
#endif

template <typename X, typename W>
void linear_group(const Products<X, W>& p, const W* const* w, const PanelOut* out, int64_t ldy, int count) {
  for (int64_t m = 0; m < p.M;) {
    PanelOut rows[GROUP];
    for (int s = 0; s < count; ++s) rows[s] = {out[s].scale, out[s].bias, out[s].y + m * ldy};
#ifndef __AVX512VNNI__
    if constexpr (std::is_same_v<W, int8_t>)
      m += int8_rows(p.x + m * p.ldx, p.ldx, p.K, w, rows, ldy, count, p.M - m, m > 0);
    else
#endif
      m += linear_rows(p.x + m * p.ldx, p.ldx, p.K, w, rows, ldy, count, p.M - m, m > 0);
  }
}

// Runs body(j, group0, s0, count) over the panels of a product's weights (weight j has panels[j]):
// `count` panels from panel group0 + s0 of weight j, group0 the first of their packed group. The
// threads share the groups (`parallel_chunks`, ~8 chunks a thread: long contiguous runs for the
// prefetchers, yet a late thread still does less), or on AVX-512 builds, where a product has few
// groups, their halves (first or second pair of panels): with 9 groups on 2 threads (o and down),
// one thread would take a whole group more than the other (a bf16 AR step 0.974-0.986x, 8 / 16
// tokens 0.99x / 0.954x, fp32 16 tokens 0.983x, the draft pass 0.98-0.995x; `kernel_ab.py`,
// 2026-11-27, Zen 5; same bits). The AVX2 build keeps its groups whole: halves measured no faster
// there (1 token 0.997x).
template <typename F>
void for_each_panel_run(const std::vector<int64_t>& panels, const F& body) {
  std::vector<int64_t> first(panels.size() + 1, 0);  // first global group of each weight
  for (size_t j = 0; j < panels.size(); ++j) first[j + 1] = first[j] + (panels[j] + GROUP - 1) / GROUP;
  const int threads = at::get_num_threads(), halves = AVX512_BUILD && first.back() < 8 * threads ? 2 : 1;
  const int64_t units = first.back() * halves, chunk = std::max<int64_t>(1, units / (8 * threads));
  parallel_chunks(units, chunk, [&](int64_t begin, int64_t end) {
    size_t j = std::upper_bound(first.begin(), first.end(), begin / halves) - first.begin() - 1;
    for (int64_t u = begin; u < end; ++u) {
      const int64_t g = u / halves;
      while (g >= first[j + 1]) ++j;
      const int64_t group0 = (g - first[j]) * GROUP;
      const int in_group = static_cast<int>(std::min<int64_t>(GROUP, panels[j] - group0));
      const int s0 = static_cast<int>(u % halves) * (GROUP / 2);
      const int count = halves == 1 ? in_group : std::min(in_group, s0 + GROUP / 2) - s0;
      if (count > 0) body(j, group0, s0, count);  // (a group of 1 or 2 panels has no second half)
    }
  });
}

template <typename X, typename W>
void linear_impl(const Products<X, W>& p) {
  const int64_t Kw = packed_width<W>(p.K), count = static_cast<int64_t>(p.w.size());
  std::vector<int64_t> panels(count);
  for (int64_t j = 0; j < count; ++j) panels[j] = p.N[j] / PANEL;
  for_each_panel_run(panels, [&](size_t j, int64_t group0, int s0, int run) {
    const W* w[GROUP];
    PanelOut out[GROUP];
    for (int s = 0; s < run; ++s) {
      const int64_t n0 = (group0 + s0 + s) * PANEL;
      w[s] = panel_start(p.w[j] + group0 * PANEL * Kw, Kw, s0 + s);
      out[s] = {p.scale[j] ? p.scale[j] + n0 : nullptr, p.bias[j] ? p.bias[j] + n0 : nullptr, p.y[j] + n0};
    }
    linear_group(p, w, out, p.N[j], run);
    if (p.after) (*p.after)(j, (group0 + s0) * PANEL, (group0 + s0 + run) * PANEL);
  });
  for (int64_t j = 0; j < count; ++j) {  // features past the last whole panel (row-major)
    const int64_t whole = p.N[j] / PANEL * PANEL;
    for (int64_t n = whole; n < p.N[j]; ++n)
      if constexpr (std::is_same_v<W, int8_t>)
        int8_feature(p.x, p.ldx, p.M, p.K, p.w[j] + n * Kw, p.scale[j][n], p.bias[j] ? p.bias[j] + n : nullptr, p.y[j] + n, p.N[j]);
      else
        linear_feature(p.xf, p.M, p.K, p.w[j] + n * Kw, p.bias[j] ? p.bias[j] + n : nullptr, p.y[j] + n, p.N[j]);
    if (p.after && whole < p.N[j]) (*p.after)(j, whole, p.N[j]);
  }
}

// x's rows as bf16 pairs, the even input in the low half (the dot instruction's operand; exact
// when x holds bf16 values), an odd K's last input paired with a zero.
std::vector<uint32_t> bf16_pairs(const float* x, int64_t M, int64_t K) {
  const int64_t half = (K + 1) / 2;
  std::vector<uint32_t> pairs(M * half, 0);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = x + m * K;
    uint32_t* out = pairs.data() + m * half;
    int64_t k = 0;
#ifdef __AVX512F__
    for (; k + 16 <= K; k += 16)  // 16 inputs' top halves: 8 pairs
      store16(_mm512_loadu_ps(row + k), reinterpret_cast<bf16*>(out) + k);
#endif
    for (; k < K; ++k) {
      uint32_t bits;
      std::memcpy(&bits, row + k, 4);
      out[k / 2] |= (bits >> 16) << (16 * (k % 2));
    }
  }
  return pairs;
}

// The sum of n int8 values, 32 at a time (an integer sum: exact in any order).
inline int32_t sum_of_bytes(const int8_t* q, int64_t n) {
  __m256i sums = _mm256_setzero_si256();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i)));
    sums = _mm256_add_epi32(sums, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
  int32_t lanes[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), sums);
  int32_t sum = std::accumulate(lanes, lanes + 8, 0);
  for (; i < n; ++i) sum += q[i];
  return sum;
}

// x's rows for int8 weights: each row over its largest magnitude (x 127, rounded to [-127, 127]), 4
// inputs a word (a last partial word zero-padded), then the row's scale (fp32 bits) and the sum of
// its quantized inputs (see `int8_tile`); for 4-bit weights then, per `group` inputs, the sum of
// the group's (fp32, exact; see `q4_tile`).
template <typename A>
std::vector<uint32_t> int8_quads(const A* x, int64_t M, int64_t K, int64_t group = 0) {
  const int64_t steps = (K + 3) / 4, groups = group ? K / group : 0, ld = steps + 2 + groups;
  std::vector<uint32_t> quads(M * ld, 0);
  for (int64_t m = 0; m < M; ++m) {
    uint32_t* out = quads.data() + m * ld;
    int32_t sum = 0;
    const float scale = quantize_row(x + m * K, K, reinterpret_cast<int8_t*>(out), &sum);
    std::memcpy(out + steps, &scale, 4);
    out[steps + 1] = static_cast<uint32_t>(sum);
    const auto* q = reinterpret_cast<const int8_t*>(out);
    for (int64_t g = 0; g < groups; ++g) {
      const float group_sum = static_cast<float>(sum_of_bytes(q + g * group, group));
      std::memcpy(out + steps + 2 + g, &group_sum, 4);
    }
  }
  return quads;
}

// Rounding to the dtype a value is stored in, one value or a vector's lanes (bf16: to nearest, ties to even).
inline float store_round(float v, float*) { return v; }
inline float store_round(float v, bf16*) { return static_cast<float>(static_cast<bf16>(v)); }

template <typename V>
inline V round_lanes(V v, float*) { return v; }
template <typename V>
inline V round_lanes(V v, bf16*) {
  using U = typename Ints<V>::bits;
  const U i = (U)v;
  return (V)((i + (0x7fffu + ((i >> 16) & 1u))) & 0xffff0000u);
}

// 8 lanes stored in T's format; `v` already holds values of that format (exact).
inline void store8(__m256 v, float* p) { _mm256_storeu_ps(p, v); }
inline void store8(__m256 v, bf16* p) {
  const __m256i hi = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1)));
}

// One weight of a product: packed (fp32, bf16 or int8), with its fp32 scales (int8 only) and fp32
// bias; a null or undefined tensor where there is none.
struct Operand {
  const torch::Tensor* w;
  const torch::Tensor* scale;
  const torch::Tensor* bias;
};

inline const float* floats_or_null(const torch::Tensor* t) { return t && t->defined() ? t->data_ptr<float>() : nullptr; }

// 4-bit weights for drafting, where a weight is 4-bit already (a Q4_1 GGUF's are): each output
// feature's weights in groups of Q4_INPUTS inputs, w = d * q + m with q in [0, 15] and d, m fp16 per
// group and feature (Q4_1's own form, so nothing is lost). A panel's group is one block of Q4_BLOCK
// bytes: per 8 inputs 64 bytes, feature f's word holding input 8j + b in the low nibble of its byte
// b and 8j + 4 + b in the high one (two masks give the integer dot's unsigned operand for two input
// quads), then the group's 16 d's and 16 m's. Blocks go panel by panel, group by group: one stream.
constexpr int64_t Q4_INPUTS = 32;
constexpr int64_t Q4_BLOCK = PANEL * Q4_INPUTS / 2 + 2 * PANEL * 2;

// The weight [N, K] in that layout (uint8 [N / 16, K / 32 * Q4_BLOCK]), or an undefined tensor when
// it is not 4-bit: some value off its group's grid (fitted to the group's least and greatest value)
// by a step of int8 drafts (a bf16 copy of 4-bit weights stays well within), or N, K not whole
// panels and groups.
torch::Tensor pack_q4(const torch::Tensor& w) {
  TORCH_CHECK(w.dim() == 2, "pack_q4: a weight [N, K]");
  const int64_t N = w.size(0), K = w.size(1), groups = K / Q4_INPUTS;
  if (N % PANEL || K % Q4_INPUTS || N == 0 || K == 0) return {};
  const auto wf = w.detach().to(at::kFloat).contiguous();
  auto out = torch::zeros({N / PANEL, groups * Q4_BLOCK}, wf.options().dtype(at::kByte));
  const float* src = wf.data_ptr<float>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  std::atomic<bool> on_grid{true};
  at::parallel_for(0, N, PANEL, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end && on_grid; ++n) {
      const int64_t f = n % PANEL;
      float largest = 0.f;  // off by less than a step of int8 drafts (a weight that is not 4-bit: ~8 steps)
      for (int64_t k = 0; k < K; ++k) largest = std::max(largest, std::fabs(src[n * K + k]));
      const float bound = largest / 127.f;
      for (int64_t g = 0; g < groups; ++g) {
        const float* v = src + n * K + g * Q4_INPUTS;
        const float least = *std::min_element(v, v + Q4_INPUTS), most = *std::max_element(v, v + Q4_INPUTS);
        const at::Half d16((most - least) / 15.f), m16(least);
        const float d = d16, m = m16;
        uint8_t* block = dst + (n / PANEL) * groups * Q4_BLOCK + g * Q4_BLOCK;
        for (int64_t i = 0; i < Q4_INPUTS; ++i) {
          const float q = d > 0.f ? std::nearbyint((v[i] - m) / d) : 0.f;
          if (!(q >= 0.f && q <= 15.f && std::fabs(d * q + m - v[i]) <= bound)) {
            on_grid = false;
            return;
          }
          block[64 * (i / 8) + 4 * f + i % 4] |= static_cast<uint8_t>(q) << (i % 8 < 4 ? 0 : 4);
        }
        std::memcpy(block + PANEL * Q4_INPUTS / 2 + 2 * f, &d16, 2);
        std::memcpy(block + PANEL * Q4_INPUTS / 2 + 2 * PANEL + 2 * f, &m16, 2);
      }
    }
  });
  return on_grid ? out : torch::Tensor();
}

// A weight for the drafts' products: 4-bit where it is 4-bit already (nothing lost, fewer bytes to
// stream than int8), else int8 with its scales.
std::vector<torch::Tensor> draft_weight(const torch::Tensor& w) {
  if (auto q4 = pack_q4(w); q4.defined()) return {q4, torch::Tensor()};
  return quantize(w);
}

// 4-bit products: x's rows as `int8_quads` with group sums; an output is, per group in order, acc +=
// float(integer dot) * d, then acc += m * x's group sum (two FMAs), then acc * x's scale (+ bias):
// the same operations in every build and tile.
#ifdef __AVX512VNNI__
// R rows over S panels (S consecutive blocks of `stride` bytes): per group, 8 integer dots of 4
// inputs x 16 features per row and panel, then the group's d and m.
template <int R, int S>
inline void q4_tile(const uint32_t* x, int64_t ldx, int64_t groups, const uint8_t* w, int64_t stride, const PanelOut* out,
                    int64_t ldy) {
  const int64_t words = groups * (Q4_INPUTS / 4);
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[R][S];
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) acc[r][s] = _mm512_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, w += Q4_BLOCK) {
    for (int s = 0; s < S; ++s)  // as the other tiles: the weights PREFETCH_BYTES ahead
      for (int64_t b = 0; b < Q4_BLOCK; b += 64) prefetch(reinterpret_cast<const char*>(w + s * stride) + PREFETCH_BYTES + b);
    __m512i dot[R][S], dot_high[R][S];  // two chains a row and panel (integer sums: exact in any order)
    for (int r = 0; r < R; ++r)
      for (int s = 0; s < S; ++s) dot[r][s] = dot_high[r][s] = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      __m512i low[S], high[S];
      for (int s = 0; s < S; ++s) {
        const __m512i v = _mm512_loadu_si512(w + s * stride + 64 * j);
        low[s] = _mm512_and_si512(v, nibble), high[s] = _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble);
      }
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        const uint32_t* quads = x + r * ldx + g * (Q4_INPUTS / 4) + 2 * j;
        const __m512i first = _mm512_set1_epi32(static_cast<int>(quads[0])), second = _mm512_set1_epi32(static_cast<int>(quads[1]));
        for (int s = 0; s < S; ++s) {
          dot[r][s] = _mm512_dpbusd_epi32(dot[r][s], low[s], first);
          dot_high[r][s] = _mm512_dpbusd_epi32(dot_high[r][s], high[s], second);
        }
      }
    }
    for (int s = 0; s < S; ++s) {
      const uint8_t* scales = w + s * stride + PANEL * Q4_INPUTS / 2;
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + 2 * PANEL)));
#pragma GCC unroll 6
      for (int r = 0; r < R; ++r) {
        acc[r][s] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(dot[r][s], dot_high[r][s])), d, acc[r][s]);
        acc[r][s] = _mm512_fmadd_ps(m, _mm512_set1_ps(group_sum(x + r * ldx, words, g)), acc[r][s]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int s = 0; s < S; ++s) {
      __m512 v = _mm512_mul_ps(acc[r][s], _mm512_set1_ps(row_scale(x + r * ldx, words)));
      if (out[s].bias) v = _mm512_add_ps(v, _mm512_loadu_ps(out[s].bias));
      _mm512_storeu_ps(out[s].y + r * ldy, v);
    }
}
constexpr int Q4_ROWS = 4, Q4_PANELS = 2;
#else
// Without VNNI: each half panel (8 features) in 256 bits; weight bytes times input bytes in pairs
// of 16 bits (at most 2 * 15 * 127: no saturation), then pairs of lanes into 32 bits.
template <int R, int S>
inline void q4_tile(const uint32_t* x, int64_t ldx, int64_t groups, const uint8_t* w, int64_t, const PanelOut* out,
                    int64_t ldy) {
  static_assert(S == 1, "one panel at a time in 256 bits");
  const int64_t words = groups * (Q4_INPUTS / 4);
  const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < groups; ++g, w += Q4_BLOCK) {
    for (int64_t b = 0; b < Q4_BLOCK; b += 64) prefetch(reinterpret_cast<const char*>(w) + PREFETCH_BYTES + b);
    __m256i dot[R][2];
    for (int r = 0; r < R; ++r) dot[r][0] = dot[r][1] = _mm256_setzero_si256();
    for (int j = 0; j < 4; ++j)
      for (int h = 0; h < 2; ++h) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 64 * j + 32 * h));
        const __m256i low = _mm256_and_si256(v, nibble), high = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
        for (int r = 0; r < R; ++r) {
          const uint32_t* quads = x + r * ldx + g * (Q4_INPUTS / 4) + 2 * j;
          const __m256i a = _mm256_maddubs_epi16(low, _mm256_set1_epi32(static_cast<int>(quads[0])));
          const __m256i b = _mm256_maddubs_epi16(high, _mm256_set1_epi32(static_cast<int>(quads[1])));
          dot[r][h] = _mm256_add_epi32(dot[r][h], _mm256_madd_epi16(_mm256_add_epi16(a, b), ones));
        }
      }
    for (int h = 0; h < 2; ++h) {
      const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + PANEL * Q4_INPUTS / 2 + 16 * h)));
      const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + PANEL * Q4_INPUTS / 2 + 2 * PANEL + 16 * h)));
      for (int r = 0; r < R; ++r) {
        acc[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[r][h]), d, acc[r][h]);
        acc[r][h] = _mm256_fmadd_ps(m, _mm256_set1_ps(group_sum(x + r * ldx, words, g)), acc[r][h]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int h = 0; h < 2; ++h) {
      __m256 v = _mm256_mul_ps(acc[r][h], _mm256_set1_ps(row_scale(x + r * ldx, words)));
      if (out->bias) v = _mm256_add_ps(v, _mm256_loadu_ps(out->bias + 8 * h));
      _mm256_storeu_ps(out->y + r * ldy + 8 * h, v);
    }
}
constexpr int Q4_ROWS = 2, Q4_PANELS = 1;
#endif

// R rows over the S panels at w (the first `count` of them) in tiles of up to Q4_PANELS.
template <int R>
inline void q4_panels(const uint32_t* x, int64_t ldx, int64_t groups, const uint8_t* w, const PanelOut* out, int64_t ldy,
                      int count) {
  const int64_t stride = groups * Q4_BLOCK;
  int s = 0;
  for (; s + Q4_PANELS <= count; s += Q4_PANELS) q4_tile<R, Q4_PANELS>(x, ldx, groups, w + s * stride, stride, out + s, ldy);
  for (; s < count; ++s) q4_tile<R, 1>(x, ldx, groups, w + s * stride, stride, out + s, ldy);
}

// Products with 4-bit weights: the threads split every weight's panels in runs of up to GROUP; the
// row tiles pass over a run while it stays in cache.
template <typename A>
void run_q4(const A* x, int64_t M, int64_t K, const std::vector<Operand>& operands, const std::vector<float*>& ys,
            const Epilogue* after) {
  const int64_t groups = K / Q4_INPUTS, ldx = K / 4 + 2 + groups;
  const auto rows = int8_quads(x, M, K, Q4_INPUTS);
  std::vector<int64_t> panels(operands.size());
  for (size_t j = 0; j < operands.size(); ++j) panels[j] = operands[j].w->size(0);
  for_each_panel_run(panels, [&](size_t j, int64_t group0, int s0, int count) {
    const int64_t N = panels[j] * PANEL, panel0 = group0 + s0;
    const uint8_t* w = operands[j].w->data_ptr<uint8_t>() + panel0 * groups * Q4_BLOCK;
    const float* bias = floats_or_null(operands[j].bias);
    for (int64_t m = 0; m < M;) {
      const int64_t r = std::min<int64_t>(Q4_ROWS, M - m);
      PanelOut out[GROUP];
      for (int s = 0; s < count; ++s)
        out[s] = {nullptr, bias ? bias + (panel0 + s) * PANEL : nullptr, ys[j] + m * N + (panel0 + s) * PANEL};
      const uint32_t* xr = rows.data() + m * ldx;
      switch (r) {
        case 1: q4_panels<1>(xr, ldx, groups, w, out, N, count); break;
#ifdef __AVX512VNNI__
        case 3: q4_panels<3>(xr, ldx, groups, w, out, N, count); break;
        case 4: q4_panels<4>(xr, ldx, groups, w, out, N, count); break;
#endif
        default: q4_panels<2>(xr, ldx, groups, w, out, N, count); break;
      }
      m += r;
    }
    if (after) (*after)(j, panel0 * PANEL, (panel0 + count) * PANEL);
  });
}

// The products of x [M, K] (activations: fp32, or a bf16 model's bf16) with weights of one dtype W,
// into fp32 outputs. With bf16 weights and the dot instruction, bf16 activations are its pairs as
// they lie in memory: no copy made on one thread for the others to read. Other weights take x's
// values in fp32 or as int8 rows, the same values from either dtype.
template <typename W, typename A>
void run_products(const A* x, int64_t M, int64_t K, const std::vector<Operand>& operands, const std::vector<float*>& ys,
                  const Epilogue* after) {
  std::vector<float> widened;
  auto in_fp32 = [&]() -> const float* {  // x in fp32, for the fp32 products and the features past the last whole panel
    if constexpr (std::is_same_v<A, float>) {
      return x;
    } else {
      if (widened.empty()) widened.resize(M * K), widen(x, M * K, widened.data());
      return widened.data();
    }
  };
  auto run = [&](const auto* tile_x, int64_t ldx, const float* xf) {
    using X = std::remove_const_t<std::remove_pointer_t<decltype(tile_x)>>;
    Products<X, W> p{tile_x, ldx, xf, M, K, {}, {}, {}, {}, ys, after};
    for (const Operand& o : operands) {
      p.w.push_back(o.w->template data_ptr<W>());
      p.N.push_back(o.w->size(0));
      p.scale.push_back(floats_or_null(o.scale));
      p.bias.push_back(floats_or_null(o.bias));
    }
    linear_impl(p);
  };
  if constexpr (std::is_same_v<W, int8_t>) {
    const auto quads = int8_quads(x, M, K);
    run(quads.data(), (K + 3) / 4 + 2, nullptr);
  } else {
#ifdef __AVX512BF16__
    if constexpr (std::is_same_v<W, bf16> && std::is_same_v<A, bf16>) {
      const bool tails = std::any_of(operands.begin(), operands.end(), [](const Operand& o) { return o.w->size(0) % PANEL != 0; });
      if (K % 2 == 0) return run(reinterpret_cast<const uint32_t*>(x), K / 2, tails ? in_fp32() : nullptr);
      const auto pairs = bf16_pairs(in_fp32(), M, K);  // an odd K's last input paired with a zero
      return run(pairs.data(), (K + 1) / 2, in_fp32());
    }
#endif
    run(in_fp32(), K, in_fp32());
  }
}

template <typename A>
void products(const A* x, int64_t M, int64_t K, const std::vector<Operand>& operands, const std::vector<float*>& ys,
              const Epilogue* after = nullptr) {
  switch (operands.at(0).w->scalar_type()) {
    case at::kFloat: return run_products<float>(x, M, K, operands, ys, after);
    case at::kBFloat16: return run_products<bf16>(x, M, K, operands, ys, after);
    case at::kChar: return run_products<int8_t>(x, M, K, operands, ys, after);
    case at::kByte: return run_q4(x, M, K, operands, ys, after);
    default: TORCH_CHECK(false, "weights must be fp32, bf16, int8 or 4-bit");
  }
}

// x [..., K] fp32 or bf16; weights [N_j, K] as `pack` or `quantize` returns them, all of one dtype;
// int8 weights with their scales [N_j]; biases [N_j] or None -> [..., N_j] each, in x's dtype
// (accumulated in fp32, rounded once); with `float_out` in fp32 holding those values (a bf16
// model's logits as `.float()` of its bf16 logits has them, without the two copies).
std::vector<torch::Tensor> linear(const torch::Tensor& x, const std::vector<torch::Tensor>& ws,
                                  const std::vector<c10::optional<torch::Tensor>>& biases,
                                  const std::vector<c10::optional<torch::Tensor>>& scales, bool float_out) {
  TORCH_CHECK(x.dim() >= 1 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16), "x: fp32 or bf16 [..., K]");
  TORCH_CHECK(!ws.empty() && biases.size() == ws.size() && scales.size() == ws.size(), "one bias and one scale (or None) per weight");
  const int64_t K = x.size(-1), M = x.numel() / K;
  const auto xc = x.contiguous();
  std::vector<torch::Tensor> ys(ws.size()), bs(ws.size()), cs(ws.size());
  std::vector<Operand> operands;
  std::vector<float*> outs;
  for (size_t j = 0; j < ws.size(); ++j) {
    const auto& w = ws[j];
    TORCH_CHECK(w.scalar_type() == ws[0].scalar_type(), "weights: one dtype");
    const bool q4 = w.scalar_type() == at::kByte;
    TORCH_CHECK(w.dim() == 2 && w.is_contiguous() &&
                w.size(1) == (q4 ? K / Q4_INPUTS * Q4_BLOCK : packed_width(w.scalar_type(), K)) && (!q4 || K % Q4_INPUTS == 0),
                "weights: as `pack` or `draft_weight` return them for x [..., K]");
    const int64_t N = q4 ? w.size(0) * PANEL : w.size(0);
    if (biases[j] && biases[j]->defined()) {
      TORCH_CHECK(biases[j]->numel() == N, "bias: [N]");
      bs[j] = biases[j]->to(at::kFloat).contiguous();
    }
    TORCH_CHECK((w.scalar_type() == at::kChar) == (scales[j] && scales[j]->defined()), "int8 weights, and only they, take scales");
    if (w.scalar_type() == at::kChar) {
      TORCH_CHECK(scales[j]->scalar_type() == at::kFloat && scales[j]->numel() == w.size(0) && scales[j]->is_contiguous(), "scale: fp32 [N]");
      cs[j] = *scales[j];
    }
    ys[j] = torch::empty({M, N}, xc.options().dtype(at::kFloat));
    operands.push_back({&ws[j], &cs[j], &bs[j]});
    outs.push_back(ys[j].data_ptr<float>());
  }
  const bool bf16_in_fp32 = x.scalar_type() == at::kBFloat16 && float_out;
  const Epilogue to_bf16 = [&](size_t j, int64_t n0, int64_t n1) {  // bf16 values, kept in fp32
    const int64_t N = ys[j].size(1);
    for (int64_t m = 0; m < M; ++m) {
      float* y = outs[j] + m * N;
      int64_t i = n0;
      for (; i + 8 <= n1; i += 8) _mm256_storeu_ps(y + i, round_lanes(_mm256_loadu_ps(y + i), static_cast<bf16*>(nullptr)));
      for (; i < n1; ++i) y[i] = static_cast<float>(static_cast<bf16>(y[i]));
    }
  };
  if (x.scalar_type() == at::kBFloat16)
    products(xc.data_ptr<bf16>(), M, K, operands, outs, bf16_in_fp32 ? &to_bf16 : nullptr);
  else
    products(xc.data_ptr<float>(), M, K, operands, outs, bf16_in_fp32 ? &to_bf16 : nullptr);
  auto shape = x.sizes().vec();
  for (size_t j = 0; j < ys.size(); ++j) {
    shape.back() = ys[j].size(1);
    ys[j] = ys[j].view(shape);
    if (!bf16_in_fp32) ys[j] = ys[j].to(x.scalar_type());
  }
  return ys;
}

template <typename KV>
inline float dot(const float* q, const KV* k, int64_t D) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= D; d += 8) acc = _mm256_fmadd_ps(load8(q + d), load8(k + d), acc);
  float s = hsum(acc);
  for (; d < D; ++d) s = std::fma(q[d], to_float(k[d]), s);
  return s;
}

// hsum of each of 8 vectors, as one vector: the same tree per vector ((lo + hi), then pairs, then
// the last two), the 8 reductions sharing their shuffles.
inline __m256 hsum8(const __m256* v) {
  __m256 lo_hi[4];  // [v(2i) lo + hi | v(2i+1) lo + hi]
  for (int i = 0; i < 4; ++i)
    lo_hi[i] = _mm256_add_ps(_mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x20),
                             _mm256_permute2f128_ps(v[2 * i], v[2 * i + 1], 0x31));
  __m256 pairs[2];  // per 128-bit lane, the pair sums of two reductions
  for (int i = 0; i < 2; ++i)
    pairs[i] = _mm256_add_ps(_mm256_shuffle_ps(lo_hi[2 * i], lo_hi[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm256_shuffle_ps(lo_hi[2 * i], lo_hi[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m256 sums = _mm256_add_ps(_mm256_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                    _mm256_shuffle_ps(pairs[0], pairs[1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm256_permutevar8x32_ps(sums, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));  // [0 2 4 6 | 1 3 5 7] in order
}

// q's dot products with 8 keys (`stride` apart), each the same ops in the same order as `dot` (D a
// multiple of 8): 8 independent chains, and one reduction for all 8.
template <typename KV>
inline __m256 dot8(const float* q, const KV* k, int64_t stride, int64_t D) {
  __m256 acc[8];
  for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();
  for (int64_t d = 0; d < D; d += 8) {
    const __m256 qd = load8(q + d);
    for (int j = 0; j < 8; ++j) acc[j] = _mm256_fmadd_ps(qd, load8(k + j * stride + d), acc[j]);
  }
  return hsum8(acc);
}

// The weighted sums' vectors: the widest the build has (each output dimension's FMA chain over the
// keys is the same at any width, so every build gives the same bits).
#ifdef __AVX512F__
using Wide = __m512;
constexpr int WIDE = 16;
inline Wide wide_load(const float* p) { return _mm512_loadu_ps(p); }
inline Wide wide_load(const bf16* p) {  // bf16 -> fp32 is a 16-bit shift, exact
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline Wide wide_set1(float v) { return _mm512_set1_ps(v); }
inline Wide wide_fma(Wide a, Wide b, Wide c) { return _mm512_fmadd_ps(a, b, c); }
inline void wide_store(float* p, Wide v) { _mm512_storeu_ps(p, v); }
#else
using Wide = __m256;
constexpr int WIDE = 8;
template <typename KV>
inline Wide wide_load(const KV* p) { return load8(p); }
inline Wide wide_set1(float v) { return _mm256_set1_ps(v); }
inline Wide wide_fma(Wide a, Wide b, Wide c) { return _mm256_fmadd_ps(a, b, c); }
inline void wide_store(float* p, Wide v) { _mm256_storeu_ps(p, v); }
#endif

constexpr int64_t KEYS_AHEAD = 32;  // how far ahead of the keys it scores attention asks for more
constexpr int64_t VALUE_BLOCK = 16;  // values read by every query of a task while they are in L1 (even: whole pairs)
constexpr int64_t MAX_TASK_QUERIES = 64;  // queries one attention task takes at most
// From this many queries a task lays out each block of a bf16 cache's values once for all of them
// (widened to fp32, or as key pairs for the dot instruction), instead of each query reading the
// cache's again (heads up to MAX_WIDE_D wide).
constexpr int64_t WIDEN_QUERIES = 4;
constexpr int64_t MAX_WIDE_D = 256;

// The weighted sums of values take the keys in pairs by position, (0, 1), (2, 3), ..., and add the
// odd key's product first, then the even one's: the order of AVX512-BF16's dot instruction, which
// multiplies a pair of keys for 16 dimensions in one instruction where a bf16 cache's block of
// values is shared by enough queries (`pair_dots_into`). Elsewhere the same adds run as FMAs (a
// bf16 model's weights p are rounded to bf16, as its attention does, so each product of two bf16
// values is exact in fp32, as the instruction's): every build and every query count give the same
// bits. A key count that is odd ends with a pair whose odd key is zero (its weight and values).

// out[0, W*A) += the pair sums of keys s < count (values[s][0, W*A), p[s]), continuing each
// dimension's chain from what out holds.
template <int A, typename V>
inline void pair_sums_into(const float* p, const V* values, int64_t stride, int64_t count, float* out) {
  Wide acc[A];
  for (int a = 0; a < A; ++a) acc[a] = wide_load(out + WIDE * a);
  const Wide zero = wide_set1(0.f);
  for (int64_t s = 0; s < count; s += 2) {
    if (s + 1 < count) {
      const Wide odd = wide_set1(p[s + 1]);
      for (int a = 0; a < A; ++a) acc[a] = wide_fma(odd, wide_load(values + (s + 1) * stride + WIDE * a), acc[a]);
    } else {
      for (int a = 0; a < A; ++a) acc[a] = wide_fma(zero, zero, acc[a]);
    }
    const Wide even = wide_set1(p[s]);
    for (int a = 0; a < A; ++a) acc[a] = wide_fma(even, wide_load(values + s * stride + WIDE * a), acc[a]);
  }
  for (int a = 0; a < A; ++a) wide_store(out + WIDE * a, acc[a]);
}

// out[0, D) += the pair sums of keys s < count, in the widest vectors that fit.
template <typename V>
inline void pair_sums(const float* p, const V* values, int64_t stride, int64_t count, int64_t D, float* out) {
  int64_t d = 0;
  for (; d + 4 * WIDE <= D; d += 4 * WIDE) pair_sums_into<4>(p, values + d, stride, count, out + d);
  for (; d + WIDE <= D; d += WIDE) pair_sums_into<1>(p, values + d, stride, count, out + d);
  for (; d < D; ++d)
    for (int64_t s = 0; s < count; s += 2) {
      out[d] = s + 1 < count ? std::fma(p[s + 1], to_float(values[(s + 1) * stride + d]), out[d]) : std::fma(0.f, 0.f, out[d]);
      out[d] = std::fma(p[s], to_float(values[s * stride + d]), out[d]);
    }
}

// `pair_sums` of a whole block of fp32 values (VALUE_BLOCK keys, D apart; D a multiple of 2 * WIDE)
// for four queries at once: each value loaded once for the four, each query's chains the same.
inline void pair_sums4(const float* const* p, const float* values, int64_t D, float* const* out) {
  for (int64_t d = 0; d < D; d += 2 * WIDE) {
    Wide acc[4][2];
    for (int q = 0; q < 4; ++q)
      for (int a = 0; a < 2; ++a) acc[q][a] = wide_load(out[q] + d + WIDE * a);
    for (int64_t s = 0; s < VALUE_BLOCK; s += 2)
      for (const int64_t key : {s + 1, s}) {  // the pair's odd key first
        const Wide v0 = wide_load(values + key * D + d), v1 = wide_load(values + key * D + d + WIDE);
        for (int q = 0; q < 4; ++q) {
          const Wide w = wide_set1(p[q][key]);
          acc[q][0] = wide_fma(w, v0, acc[q][0]);
          acc[q][1] = wide_fma(w, v1, acc[q][1]);
        }
      }
    for (int q = 0; q < 4; ++q)
      for (int a = 0; a < 2; ++a) wide_store(out[q] + d + WIDE * a, acc[q][a]);
  }
}

// rows [0, count) of D bf16 values (`stride` apart) widened to fp32 into out (D apart): exact, so
// summing the copy gives the bits the bf16 rows give.
inline void widen_rows(const bf16* rows, int64_t stride, int64_t count, int64_t D, float* out) {
  for (int64_t s = 0; s < count; ++s) {
    int64_t d = 0;
    for (; d + 8 <= D; d += 8) _mm256_storeu_ps(out + s * D + d, load8(rows + s * stride + d));
    for (; d < D; ++d) out[s * D + d] = to_float(rows[s * stride + d]);
  }
}

inline uint32_t bf16_pair(const float* x) {  // x[0] and x[1], bf16-exact, as one word (x[0]'s bits low)
  uint32_t even, odd;
  std::memcpy(&even, x, 4);
  std::memcpy(&odd, x + 1, 4);
  return (odd & 0xFFFF0000u) | (even >> 16);
}

#ifdef __AVX512BF16__
// Rows [0, count) of D bf16 values (`stride` apart; D a multiple of 16) as key pairs: for pair m and
// dimension d, rows 2m (low half) and 2m + 1 (high half) side by side, as the dot instruction
// reads them (an odd count's last pair with a zero row).
inline void pair_rows(const bf16* rows, int64_t stride, int64_t count, int64_t D, uint32_t* out) {
  alignas(64) static const uint16_t interleave[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i order = _mm512_load_si512(interleave);
  auto row = [&](int64_t s, int64_t d) {
    return s < count ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + s * stride + d)) : _mm256_setzero_si256();
  };
  for (int64_t m = 0; 2 * m < count; ++m)
    for (int64_t d = 0; d < D; d += 16) {
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(row(2 * m, d)), row(2 * m + 1, d), 1);
      _mm512_storeu_si512(out + m * D + d, _mm512_permutexvar_epi16(order, both));
    }
}

// out[0, 16*A) += the pair sums of `pairs` key pairs (`pair_rows`' layout, D apart), each pair's
// weights as one word (the even key's bf16 bits low): one dot instruction per pair and 16
// dimensions; then, with a `lone` weight, the even key of pair `pairs` alone (its odd key zero, as
// `pair_sums_into` adds it, whatever the block holds there).
template <int A>
inline void pair_dots_into(const uint32_t* weights, const uint32_t* values, int64_t D, int64_t pairs, const float* lone,
                           float* out) {
  __m512 acc[A];
  for (int a = 0; a < A; ++a) acc[a] = _mm512_loadu_ps(out + 16 * a);
  for (int64_t m = 0; m < pairs; ++m) {
    const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(weights[m]));
    for (int a = 0; a < A; ++a)
      acc[a] = _mm512_dpbf16_ps(acc[a], (__m512bh)_mm512_loadu_si512(values + m * D + 16 * a), w);
  }
  if (lone) {
    const __m512 zero = _mm512_setzero_ps(), w = _mm512_set1_ps(*lone);
    for (int a = 0; a < A; ++a) {
      const __m512i both = _mm512_loadu_si512(values + pairs * D + 16 * a);  // the even key in the low halves
      acc[a] = _mm512_fmadd_ps(zero, zero, acc[a]);
      acc[a] = _mm512_fmadd_ps(w, _mm512_castsi512_ps(_mm512_slli_epi32(both, 16)), acc[a]);
    }
  }
  for (int a = 0; a < A; ++a) _mm512_storeu_ps(out + 16 * a, acc[a]);
}

// p's weights of keys [0, 2 * pairs) as pair words (the even key's bf16 bits low; p holds bf16
// values, whose low halves are zero).
inline void pair_weights(const float* p, int64_t pairs, uint32_t* weights) {
  for (int64_t m = 0; m < pairs; ++m) weights[m] = bf16_pair(p + 2 * m);
}

// The pair sums of keys s < count of a block in `pair_rows`' layout (D a multiple of 16).
inline void pair_dots(const float* p, const uint32_t* values, int64_t count, int64_t D, float* out) {
  uint32_t weights[VALUE_BLOCK / 2];
  const int64_t pairs = count / 2;
  pair_weights(p, pairs, weights);
  const float* lone = count % 2 ? p + count - 1 : nullptr;
  int64_t d = 0;
  for (; d + 64 <= D; d += 64) pair_dots_into<4>(weights, values + d, D, pairs, lone, out + d);
  for (; d < D; d += 16) pair_dots_into<1>(weights, values + d, D, pairs, lone, out + d);
}

// `pair_dots` of a whole block (VALUE_BLOCK keys) for four queries at once: each value read once for
// the four, each query's chains the ones `pair_dots` runs.
inline void pair_dots4(const float* const* p, const uint32_t* values, int64_t D, float* const* out) {
  constexpr int64_t pairs = VALUE_BLOCK / 2;
  uint32_t weights[4][pairs];
  for (int a = 0; a < 4; ++a) pair_weights(p[a], pairs, weights[a]);
  for (int64_t d = 0; d < D; d += 32) {
    __m512 acc[4][2];
    for (int a = 0; a < 4; ++a)
      for (int h = 0; h < 2; ++h) acc[a][h] = _mm512_loadu_ps(out[a] + d + 16 * h);
    for (int64_t m = 0; m < pairs; ++m) {
      const __m512bh v0 = (__m512bh)_mm512_loadu_si512(values + m * D + d), v1 = (__m512bh)_mm512_loadu_si512(values + m * D + d + 16);
      for (int a = 0; a < 4; ++a) {
        const __m512bh w = (__m512bh)_mm512_set1_epi32(static_cast<int>(weights[a][m]));
        acc[a][0] = _mm512_dpbf16_ps(acc[a][0], v0, w);
        acc[a][1] = _mm512_dpbf16_ps(acc[a][1], v1, w);
      }
    }
    for (int a = 0; a < 4; ++a)
      for (int h = 0; h < 2; ++h) _mm512_storeu_ps(out[a] + d + 16 * h, acc[a][h]);
  }
}
#endif

// Scores of bf16 keys in the order of AVX512-BF16's dot instruction (the order the bf16 products
// use too): 16 lanes, lane l adding, for each 32 dimensions c, the product of dimensions c + 2l + 1
// and then of c + 2l (each product exact in fp32, one rounding per add); then the two 8-lane
// halves added and hsum's tree. A bf16 model's q is bf16-exact (rounded before attention), so the
// instruction takes q's pairs as they are: 32 products an instruction on keys read as stored.
// Builds without it make the same adds with FMAs, so every build scores alike.
class PairScorer {
 public:
  static bool fits(int64_t D) { return D % 32 == 0; }

  // q[i] (D values each, bf16-exact) for i < count, kept in `scratch` in the form the adds read.
  PairScorer(const float* const* q, int64_t count, int64_t D, std::vector<float>& scratch) : D_(D) {
    scratch.resize(count * D);
    float* data = scratch.data();
    data_ = data;
    for (int64_t i = 0; i < count; ++i)
      for (int64_t p = 0; p < D / 2; ++p) {
#ifdef __AVX512BF16__  // the pair as the instruction reads it: element 2p in the low half
        const uint32_t pair = bf16_pair(q[i] + 2 * p);
        std::memcpy(data + i * D + p, &pair, 4);
#else  // the odd elements, then the even ones
        data[i * D + p] = q[i][2 * p + 1];
        data[i * D + D / 2 + p] = q[i][2 * p];
#endif
      }
  }

  float one(int64_t i, const bf16* k) const { return hsum(lanes(i, k)); }

  __m256 eight(int64_t i, const bf16* k, int64_t stride) const {  // keys k, k + stride, ..., k + 7 stride
    __m256 v[8];
#ifdef __AVX512BF16__  // `lanes` of the 8 keys side by side: 8 independent chains in flight, not one
    const float* qi = data_ + i * D_;
    __m512 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t c = 0; c < D_; c += 32) {
      const __m512bh q = (__m512bh)_mm512_loadu_si512(qi + c / 2);
      for (int j = 0; j < 8; ++j) acc[j] = _mm512_dpbf16_ps(acc[j], q, (__m512bh)_mm512_loadu_si512(k + j * stride + c));
    }
    for (int j = 0; j < 8; ++j) v[j] = halves(acc[j]);
#else  // `lanes` of 4 keys at a time side by side (8 chains: what 16 vector registers hold)
    const float* qi = data_ + i * D_;
    for (int j0 = 0; j0 < 8; j0 += 4) {
      __m256 half[4][2];
      for (int j = 0; j < 4; ++j) half[j][0] = half[j][1] = _mm256_setzero_ps();
      for (int64_t c = 0; c < D_; c += 32)
        for (int h = 0; h < 2; ++h) {
          const int64_t p = c / 2 + 8 * h;
          const __m256 q_odd = _mm256_loadu_ps(qi + p), q_even = _mm256_loadu_ps(qi + D_ / 2 + p);
          for (int j = 0; j < 4; ++j) {
            __m256 even, odd;
            load16(k + (j0 + j) * stride + c + 16 * h, even, odd);
            half[j][h] = _mm256_fmadd_ps(q_even, even, _mm256_fmadd_ps(q_odd, odd, half[j][h]));
          }
        }
      for (int j = 0; j < 4; ++j) v[j0 + j] = _mm256_add_ps(half[j][0], half[j][1]);
    }
#endif
    return hsum8(v);
  }

 private:
#ifdef __AVX512BF16__
  static __m256 halves(__m512 acc) {  // lanes 0-7 + lanes 8-15
    return _mm256_add_ps(_mm512_castps512_ps256(acc), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
  }
#endif

  __m256 lanes(int64_t i, const bf16* k) const {  // the two halves of the 16 lanes, added
    const float* qi = data_ + i * D_;
#ifdef __AVX512BF16__
    __m512 acc = _mm512_setzero_ps();
    for (int64_t c = 0; c < D_; c += 32)
      acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(qi + c / 2), (__m512bh)_mm512_loadu_si512(k + c));
    return halves(acc);
#else
    __m256 half[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};  // lanes 0-7 and 8-15
    for (int64_t c = 0; c < D_; c += 32)
      for (int h = 0; h < 2; ++h) {
        __m256 even, odd;
        load16(k + c + 16 * h, even, odd);
        const int64_t p = c / 2 + 8 * h;
        half[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qi + p), odd, half[h]);
        half[h] = _mm256_fmadd_ps(_mm256_loadu_ps(qi + D_ / 2 + p), even, half[h]);
      }
    return _mm256_add_ps(half[0], half[1]);
#endif
  }

  int64_t D_;
  const float* data_;
};

// Scores as `dot` and `dot8` compute them: fp32 caches (and bf16 heads whose size is not a
// multiple of 32).
template <typename KV>
class DotScorer {
 public:
  DotScorer(const float* const* q, int64_t D) : q_(q), D_(D) {}
  float one(int64_t i, const KV* k) const { return dot(q_[i], k, D_); }
  __m256 eight(int64_t i, const KV* k, int64_t stride) const { return dot8(q_[i], k, stride, D_); }

 private:
  const float* const* q_;
  int64_t D_;
};

// Each query's weights in place: exp(score - its top score) over keys [0, limits[i]) (a bf16
// cache's rounded to bf16, see pair_sums), their sums in totals. Key s adds into lane s % 8, in key
// order, then hsum's tree.
template <typename KV>
void softmax_rows(float* scores, int64_t used, const int64_t* limits, int64_t count, float* totals) {
  for (int64_t i = 0; i < count; ++i) {
    float* sc = scores + i * used;
    const int64_t limit = limits[i];
    int64_t s = 0;
    __m256 top8 = _mm256_set1_ps(-INFINITY);
    for (; s + 8 <= limit; s += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(sc + s));
    float lanes[8];
    _mm256_storeu_ps(lanes, top8);
    float top = *std::max_element(lanes, lanes + 8);
    for (; s < limit; ++s) top = std::max(top, sc[s]);
    __m256 total8 = _mm256_setzero_ps();
    s = 0;
#ifdef __AVX512F__  // 16 keys at a time, the same per-lane ops and the same adds into total8
    for (; s + 16 <= limit; s += 16) {
      const __m512 e = round_lanes(exp_lanes(_mm512_sub_ps(_mm512_loadu_ps(sc + s), _mm512_set1_ps(top))), static_cast<KV*>(nullptr));
      _mm512_storeu_ps(sc + s, e);
      total8 = _mm256_add_ps(total8, _mm512_castps512_ps256(e));
      total8 = _mm256_add_ps(total8, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
    }
#endif
    for (; s + 8 <= limit; s += 8) {
      const __m256 e = round_lanes(exp_lanes(_mm256_sub_ps(_mm256_loadu_ps(sc + s), _mm256_set1_ps(top))), static_cast<KV*>(nullptr));
      _mm256_storeu_ps(sc + s, e);
      total8 = _mm256_add_ps(total8, e);
    }
    totals[i] = hsum(total8);
    for (; s < limit; ++s) totals[i] += sc[s] = store_round(exp1(sc[s] - top), static_cast<KV*>(nullptr));
  }
}

// Queries sharing one kv head (query i as `scorer` holds it, its output at out[i], seeing keys
// [0, limits[i]), the last of them read from slot lasts[i]: a token tree's leaf, whose own key sits
// after its ancestors' siblings, attends as if it were right after its ancestors) attend: scores (8 keys at a time), softmax and the weighted sum of values run
// over the keys in a fixed order (each output dimension one FMA chain over the keys), so a query's
// result does not depend on which other queries share the call. The queries take each block of
// keys, then each block of values, in turn: the head's cache comes from memory once for all of
// them, not once per query (what counts at long contexts).
template <typename KV, typename Scorer>
void attend_queries(const Scorer& scorer, float* const* out, const int64_t* limits, const int64_t* lasts, int64_t count,
                    const KV* keys, const KV* values, int64_t kv_stride, int64_t D, float scale, std::vector<float>& scores) {
  const int64_t used = *std::max_element(limits, limits + count);
  scores.resize(count * used);
  const int64_t row_bytes = D * static_cast<int64_t>(sizeof(KV));
  for (int64_t s = 0; D % 8 == 0 && s + 8 <= used; s += 8) {
    // the cache is not in any cache after a pass's weights went through: ask for keys KEYS_AHEAD
    // ahead, and for the values the weighted sums will read next
    for (int64_t j = 0; j < 8; ++j)
      for (int64_t b = 0; b < row_bytes; b += 64) {
        prefetch(reinterpret_cast<const char*>(keys + (s + KEYS_AHEAD + j) * kv_stride) + b);
        prefetch(reinterpret_cast<const char*>(values + (s + j) * kv_stride) + b);
      }
    for (int64_t i = 0; i < count; ++i)
      if (s + 8 <= limits[i])
        _mm256_storeu_ps(scores.data() + i * used + s,
                         _mm256_mul_ps(scorer.eight(i, keys + s * kv_stride, kv_stride), _mm256_set1_ps(scale)));
  }
  for (int64_t i = 0; i < count; ++i) {  // the keys past the blocks of 8, one by one
    float* sc = scores.data() + i * used;
    const int64_t limit = limits[i];
    auto key = [&](int64_t s) { return keys + (s == limit - 1 ? lasts[i] : s) * kv_stride; };
    const int64_t blocks = D % 8 == 0 ? limit / 8 * 8 : 0;
    if (lasts[i] != limit - 1 && blocks == limit)  // the last key was scored in a block of 8: rescore it
      sc[limit - 1] = scorer.one(i, key(limit - 1)) * scale;  // (`eight` scores each key as `one` does)
    for (int64_t s = blocks; s < limit; ++s) sc[s] = scorer.one(i, key(s)) * scale;
  }
  float totals[MAX_TASK_QUERIES];
  softmax_rows<KV>(scores.data(), used, limits, count, totals);
  for (int64_t i = 0; i < count; ++i) std::fill_n(out[i], D, 0.f);
  constexpr bool bf16_cache = std::is_same_v<KV, bf16>;
  // four queries take a whole block of values at once: a bf16 cache's widened to fp32 first (for
  // enough queries), an fp32 cache's as stored (an fp32 pass of 8 / 16 tokens after 1,000 cached
  // 0.97x / 0.96x with AVX-512, 0.96x / 0.99x on AVX2, same bits; `kernel_ab.py`, 2026-11-27, Zen 5)
  const bool shared = bf16_cache ? count >= WIDEN_QUERIES && D <= MAX_WIDE_D : count >= 4 && kv_stride == D;
#ifdef __AVX512BF16__
  const bool dots = bf16_cache && shared && D % 16 == 0;
#else
  const bool dots = false;
#endif
  alignas(64) float block[VALUE_BLOCK * MAX_WIDE_D];  // a block of values widened to fp32, or as key pairs (`dots`)
  std::vector<KV> last_pair;  // a tree leaf's last pair of keys, its moved key in place
  for (int64_t first = 0; first < used; first += VALUE_BLOCK) {
    const int64_t rows = std::min(VALUE_BLOCK, used - first);
    const float* laid = block;  // the block's values, D apart, as the shared sums read them
    if constexpr (!bf16_cache) laid = values + first * kv_stride;
    if constexpr (bf16_cache) {
#ifdef __AVX512BF16__
      if (dots) pair_rows(values + first * kv_stride, kv_stride, rows, D, reinterpret_cast<uint32_t*>(block));
#endif
      if (shared && !dots) widen_rows(values + first * kv_stride, kv_stride, rows, D, block);
    }
    const float* four_p[4];  // queries that take the whole block, four at a time
    float* four_out[4];
    int four = 0;
    auto sum_block = [&](int queries) {  // four_p's first `queries` (4: at once, else one by one)
#ifdef __AVX512BF16__
      if (dots) {
        if (queries == 4) return pair_dots4(four_p, reinterpret_cast<const uint32_t*>(block), D, four_out);
        for (int a = 0; a < queries; ++a) pair_dots(four_p[a], reinterpret_cast<const uint32_t*>(block), VALUE_BLOCK, D, four_out[a]);
        return;
      }
#endif
      if (queries == 4) return pair_sums4(four_p, laid, D, four_out);
      for (int a = 0; a < queries; ++a) pair_sums(four_p[a], laid, D, VALUE_BLOCK, D, four_out[a]);
    };
    for (int64_t i = 0; i < count; ++i) {
      const int64_t n = std::min(VALUE_BLOCK, limits[i] - first);
      if (n <= 0) continue;
      const float* p = scores.data() + i * used + first;
      // a block that ends with a moved last key: the pairs before the moved key's own pair, then that pair
      const bool moved = first + n == limits[i] && lasts[i] != limits[i] - 1;
      const int64_t plain = n - moved, paired = moved ? plain & ~int64_t{1} : n;
      if (shared && n == VALUE_BLOCK && !moved && D % 32 == 0) {  // a whole laid-out block: four queries at once
        four_p[four] = p, four_out[four] = out[i];
        if (++four == 4) sum_block(4), four = 0;
        continue;
      }
      if (dots) {
#ifdef __AVX512BF16__
        pair_dots(p, reinterpret_cast<const uint32_t*>(block), paired, D, out[i]);
#endif
      } else if (shared) {
        pair_sums(p, laid, D, paired, D, out[i]);
      } else {
        pair_sums(p, values + first * kv_stride, kv_stride, paired, D, out[i]);
      }
      if (moved) {
        const KV* moved_key = values + lasts[i] * kv_stride;
        last_pair.resize(2 * D);
        if (plain > paired) std::copy_n(values + (first + paired) * kv_stride, D, last_pair.data());
        std::copy_n(moved_key, D, last_pair.data() + (plain - paired) * D);
        pair_sums(p + paired, last_pair.data(), D, n - paired, D, out[i]);
      }
    }
    sum_block(four);
  }
  for (int64_t i = 0; i < count; ++i)
    for (int64_t d = 0; d < D; ++d) out[i][d] /= totals[i];
}

#ifdef __AMX_BF16__
// Attention on the tile unit (the AMX build; a bf16 cache, heads a multiple of 32 and at most
// MAX_WIDE_D wide). Scores: 16 keys, read from the cache as they lie, by 16 queries laid out as
// dimension pairs. Weighted sums: 16 queries' weights (bf16, as `pair_sums` rounds them) by 32 keys'
// values (`pair_rows`' layout) for 16 dimensions. Every tile is 16 x 16 whatever the query count
// (missing queries and keys zero), and a key past a query's limit weighs zero, which adds nothing,
// so each query gets the bits it gets alone. A tree leaf's moved key is scored in a block of its own,
// and where it is summed, the leaf's weights go through a second multiply of the block with the
// moved key's values in its place (the other queries' weights zero in one multiply, the leaf's in the other).
constexpr int64_t AMX_KEYS = 16, AMX_VALUE_KEYS = 32;

void amx_attend(const float* const* q, float* const* out, const int64_t* limits, const int64_t* lasts, int64_t count,
                const bf16* keys, const bf16* values, int64_t kv_stride, int64_t D, float scale, std::vector<float>& scores) {
  const int64_t used = *std::max_element(limits, limits + count);
  scores.resize(count * used);
  configure_tiles(16);
  alignas(64) uint32_t queries[MAX_WIDE_D / 2 * 16];  // [D / 2 pairs][16 queries]
  alignas(64) bf16 rows[AMX_VALUE_KEYS * MAX_WIDE_D];  // keys or values copied: a block's last, or with a moved key
  alignas(64) uint32_t pairs[AMX_VALUE_KEYS / 2 * 64];  // a block's values for up to 64 dimensions, `pair_rows`' layout
  alignas(64) bf16 weights[16 * AMX_VALUE_KEYS];  // [16 queries][32 keys]
  alignas(64) float sums[16 * 64];
  float totals[MAX_TASK_QUERIES];
  auto score_tile = [&](const bf16* k, int64_t stride) {  // sums[key][query]
    _tile_zero(0);
    for (int64_t c = 0; c < D; c += 32) {
      _tile_loadd(4, k + c, stride * 2);
      _tile_loadd(5, queries + c / 2 * 16, 64);
      _tile_dpbf16ps(0, 4, 5);
    }
    _tile_stored(0, sums, 64);
  };
  auto value_tiles = [&](int tiles) {  // the weights by `pairs`' 16 * tiles dimensions
    const int64_t stride = 16 * tiles * 4;
    _tile_loadd(4, weights, 64);
    _tile_loadd(5, pairs, stride);
    _tile_dpbf16ps(0, 4, 5);
    _tile_loadd(6, pairs + 16, stride);
    _tile_dpbf16ps(1, 4, 6);
    if (tiles > 2) {
      _tile_loadd(5, pairs + 32, stride);
      _tile_dpbf16ps(2, 4, 5);
      _tile_loadd(6, pairs + 48, stride);
      _tile_dpbf16ps(3, 4, 6);
    }
  };
  const __m512i column = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                            _mm512_set1_epi32(16));  // a score tile's column: key r at r * 16
  for (int64_t g0 = 0; g0 < count; g0 += 16) {
    const int64_t group = std::min<int64_t>(16, count - g0), reach = *std::max_element(limits + g0, limits + g0 + group);
    std::fill_n(queries, D / 2 * 16, 0u);
    for (int64_t j = 0; j < group; ++j)
      for (int64_t p = 0; p < D / 2; ++p) queries[p * 16 + j] = bf16_pair(q[g0 + j] + 2 * p);
    for (int64_t s = 0; s < reach; s += AMX_KEYS) {
      const int64_t n = std::min(AMX_KEYS, reach - s);
      if (n == AMX_KEYS) {
        score_tile(keys + s * kv_stride, kv_stride);
      } else {  // the last keys, copied: the rows after them are past the cache's end
        std::fill_n(rows, AMX_KEYS * D, bf16(0.f));
        for (int64_t r = 0; r < n; ++r) std::copy_n(keys + (s + r) * kv_stride, D, rows + r * D);
        score_tile(rows, D);
      }
      for (int64_t j = 0; j < group; ++j) {  // query j's column of the tile, its keys up to its limit
        const int64_t valid = std::min(n, limits[g0 + j] - s);
        if (valid <= 0) continue;
        const __m512 v = _mm512_i32gather_ps(_mm512_add_epi32(column, _mm512_set1_epi32(static_cast<int>(j))), sums, 4);
        _mm512_mask_storeu_ps(scores.data() + (g0 + j) * used + s, static_cast<__mmask16>((1u << valid) - 1),
                              _mm512_mul_ps(v, _mm512_set1_ps(scale)));
      }
    }
    for (int64_t j = 0; j < group; ++j)
      if (const int64_t limit = limits[g0 + j]; lasts[g0 + j] != limit - 1) {  // a moved key: scored alone
        std::fill_n(rows, AMX_KEYS * D, bf16(0.f));
        std::copy_n(keys + lasts[g0 + j] * kv_stride, D, rows);
        score_tile(rows, D);
        scores[(g0 + j) * used + limit - 1] = sums[j] * scale;
      }
  }
  softmax_rows<bf16>(scores.data(), used, limits, count, totals);
  for (int64_t g0 = 0; g0 < count; g0 += 16) {
    const int64_t group = std::min<int64_t>(16, count - g0), reach = *std::max_element(limits + g0, limits + g0 + group);
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      const int tiles = static_cast<int>(std::min<int64_t>(64, D - d0) / 16);
      const int64_t width = 16 * tiles;
      _tile_zero(0);  // (2 and 3 unused where `tiles` is 2)
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t first = 0; first < reach; first += AMX_VALUE_KEYS) {
        const int64_t n = std::min(AMX_VALUE_KEYS, reach - first);
        auto moved_here = [&](int64_t i) {  // query i's moved key falls in this block
          return lasts[i] != limits[i] - 1 && first <= limits[i] - 1 && limits[i] - 1 < first + AMX_VALUE_KEYS;
        };
        auto lay_values = [&](const bf16* from, int64_t stride) {  // dimensions [d0, d0 + width)
          pair_rows(from + d0, stride, n, width, pairs);
          std::fill(pairs + (n + 1) / 2 * width, pairs + AMX_VALUE_KEYS / 2 * width, 0u);
        };
        auto lay_weights = [&](int64_t only) {  // every query's weights of the block, or query `only`'s alone
          std::fill_n(weights, 16 * AMX_VALUE_KEYS, bf16(0.f));
          for (int64_t j = 0; j < group; ++j) {
            const int64_t i = g0 + j;
            if (only >= 0 ? j != only : moved_here(i)) continue;
            const int64_t valid = std::min(n, limits[i] - first);  // bf16-exact weights: the conversion is exact
            for (int64_t r = 0; r < valid; r += 16) {
              const __mmask16 keep = static_cast<__mmask16>(valid - r >= 16 ? 0xFFFFu : (1u << (valid - r)) - 1);
              const __m256bh w = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(keep, scores.data() + i * used + first + r));
              _mm256_mask_storeu_epi16(weights + j * AMX_VALUE_KEYS + r, keep, (__m256i)w);
            }
          }
        };
        lay_values(values + first * kv_stride, kv_stride);
        lay_weights(-1);
        value_tiles(tiles);
        for (int64_t j = 0; j < group; ++j) {
          const int64_t i = g0 + j;
          if (!moved_here(i)) continue;
          for (int64_t r = 0; r < n; ++r)
            std::copy_n(values + (r == limits[i] - 1 - first ? lasts[i] : first + r) * kv_stride, D, rows + r * D);
          lay_values(rows, D);
          lay_weights(j);
          value_tiles(tiles);
        }
      }
      _tile_stored(0, sums, 64 * 4);
      _tile_stored(1, sums + 16, 64 * 4);
      if (tiles > 2) {
        _tile_stored(2, sums + 32, 64 * 4);
        _tile_stored(3, sums + 48, 64 * 4);
      }
      for (int64_t j = 0; j < group; ++j)
        for (int64_t d = 0; d < width; ++d) out[g0 + j][d0 + d] = sums[j * 64 + d] / totals[g0 + j];
    }
  }
}
#endif

// q [N, T, H, D] fp32 contiguous -> out [N, T, H, D] fp32; keys/values of one layer, sequence n in
// cache row rows[n] (strides kr, kg, ks for row, kv head, position); query (n, t) sees keys [0, limits[n, t]),
// the last one read from slot lasts[n, t].
// A task is half of the queries that share one kv head of one sequence (its T tokens x the heads of
// its group), in (t, head) order: two tasks a kv head keep both cores busy however few the heads. A
// thread takes its tasks' consecutive parts of one kv head in one call, reading its keys and values
// once for them (3 kv heads on 2 threads: 2 reads a thread rather than 3).
template <typename KV>
void attend_raw(const float* q, int64_t N, int64_t T, int64_t H, int64_t G, int64_t D, const KV* k, const KV* v,
                int64_t kr, int64_t kg, int64_t ks, const int64_t* rows, const int64_t* limits, const int64_t* lasts,
                float scale, float* out) {
  const int64_t group = H / G, shared = T * group;  // queries per kv head
  const int64_t parts = std::max<int64_t>(std::min<int64_t>(shared, 2), (shared + MAX_TASK_QUERIES - 1) / MAX_TASK_QUERIES);
  at::parallel_for(0, N * G * parts, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores, pairs;
    for (int64_t task = begin, taken; task < end; task += taken) {  // task = (n, g, part)
      const int64_t n = task / (G * parts), g = task / parts % G, part = task % parts;
      const int64_t first = shared * part / parts;
      taken = 1;  // and the parts after it of the same kv head in this thread's range, as many as fit a task
      while (task + taken < end && part + taken < parts && shared * (part + taken + 1) / parts - first <= MAX_TASK_QUERIES) ++taken;
      const int64_t count = shared * (part + taken) / parts - first;
      const float* qs[MAX_TASK_QUERIES];
      float* outs[MAX_TASK_QUERIES];
      int64_t lims[MAX_TASK_QUERIES], last[MAX_TASK_QUERIES];
      for (int64_t i = 0; i < count; ++i) {
        const int64_t t = (first + i) / group, h = g * group + (first + i) % group, at = ((n * T + t) * H + h) * D;
        qs[i] = q + at, outs[i] = out + at, lims[i] = limits[n * T + t], last[i] = lasts[n * T + t];
      }
      const int64_t off = rows[n] * kr + g * kg;
      if constexpr (std::is_same_v<KV, bf16>)
        if (PairScorer::fits(D)) {
#ifdef __AMX_BF16__
          if (D <= MAX_WIDE_D) {
            amx_attend(qs, outs, lims, last, count, k + off, v + off, ks, D, scale, scores);
            continue;
          }
#endif
          attend_queries(PairScorer(qs, count, D, pairs), outs, lims, last, count, k + off, v + off, ks, D, scale, scores);
          continue;
        }
      attend_queries(DotScorer<KV>(qs, D), outs, lims, last, count, k + off, v + off, ks, D, scale, scores);
    }
  });
}

// ---- the small per-token ops around the products: one call each instead of several aten ops ----

inline void store(float v, float* p) { *p = v; }
inline void store(float v, bf16* p) { *p = static_cast<bf16>(v); }

// RMSNorm of each row of x [M, C] as HF computes it: normalise in fp32, round to x's dtype, then
// scale by the weight in x's dtype. The sum of squares runs in one fixed order per row.
template <typename T>
void rmsnorm_impl(const T* x, const T* w, T* y, int64_t M, int64_t C, float eps) {
  at::parallel_for(0, M, 8, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const T* row = x + m * C;
      __m256 acc = _mm256_setzero_ps();
      int64_t c = 0;
      for (; c + 8 <= C; c += 8) {
        __m256 v = load8(row + c);
        acc = _mm256_fmadd_ps(v, v, acc);
      }
      float ss = hsum(acc);
      for (; c < C; ++c) ss = std::fma(to_float(row[c]), to_float(row[c]), ss);
      const float inv = 1.f / std::sqrt(ss / static_cast<float>(C) + eps);
      const __m256 inv8 = _mm256_set1_ps(inv);
      T* out = y + m * C;
      for (c = 0; c + 8 <= C; c += 8)
        store8(round_lanes(_mm256_mul_ps(load8(w + c), round_lanes(_mm256_mul_ps(load8(row + c), inv8), y)), y), out + c);
      for (; c < C; ++c) store(to_float(w[c]) * store_round(to_float(row[c]) * inv, y), out + c);
    }
  });
}

torch::Tensor rmsnorm(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  TORCH_CHECK(x.is_contiguous() && w.is_contiguous() && x.size(-1) == w.numel() && x.scalar_type() == w.scalar_type(),
              "rmsnorm: contiguous x [..., C] and weight [C] of one dtype");
  auto y = torch::empty_like(x);
  const int64_t C = w.numel(), M = x.numel() / C;
  if (x.scalar_type() == at::kFloat)
    rmsnorm_impl(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), M, C, static_cast<float>(eps));
  else if (x.scalar_type() == at::kBFloat16)
    rmsnorm_impl(x.data_ptr<bf16>(), w.data_ptr<bf16>(), y.data_ptr<bf16>(), M, C, static_cast<float>(eps));
  else
    TORCH_CHECK(false, "rmsnorm: fp32 or bf16");
  return y;
}

// Per row of x [R, V] (fp32 logits), each value times the row's scale (none: 1): its k largest
// values, largest first (equal values: the lower index first; NaN above all), their indices, and
// log(sum(exp(x))): what a planner needs of a draft's distributions. Each row goes in fixed pieces
// of TOP_PIECE values, the pieces of every row shared by the threads and merged in order (so a row's
// result does not depend on the others or on the thread count): freshly written logits are read by
// both cores (a draft's 3 rows took ~100 us in one thread, ~75 us so; 2026-11-27, Zen 5).
constexpr int64_t TOP_PIECE = 8192;

inline bool above(float a, float b) { return a > b || (std::isnan(a) && !std::isnan(b)); }  // NaN above all, as torch's topk

// (value, index) into the k best so far (values b, largest first, indices w; -1 where fewer): strictly
// larger moves up, so of equal values the one offered first stays first. False where it stays out.
inline bool insert_best(float* b, int64_t* w, int64_t k, float value, int64_t index) {
  if (!above(value, b[k - 1]) && w[k - 1] >= 0) return false;
  int64_t i = k - 1;
  for (; i > 0 && above(value, b[i - 1]); --i) b[i] = b[i - 1], w[i] = w[i - 1];
  b[i] = value, w[i] = index;
  return true;
}

std::vector<torch::Tensor> top_tokens(const torch::Tensor& x, int64_t k, const c10::optional<torch::Tensor>& scales) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous() && k >= 1 && k <= x.size(1),
              "top_tokens: contiguous fp32 x [R, V], 1 <= k <= V");
  const int64_t R = x.size(0), V = x.size(1), pieces = (V + TOP_PIECE - 1) / TOP_PIECE;
  torch::Tensor scale;
  if (scales && scales->defined()) {
    scale = scales->to(at::kFloat).contiguous();
    TORCH_CHECK(scale.numel() == R, "top_tokens: one scale per row");
  }
  const float* sp = scale.defined() ? scale.data_ptr<float>() : nullptr;
  // per piece: its k best (values, indices; -1 where the piece has fewer), its largest value and sum of exp(x - it)
  std::vector<float> best(R * pieces * k, -INFINITY), top(R * pieces, -INFINITY), sums(R * pieces, 0.f);
  std::vector<int64_t> where(R * pieces * k, -1);
  at::parallel_for(0, R * pieces, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t r = task / pieces, v0 = task % pieces * TOP_PIECE, v1 = std::min(V, v0 + TOP_PIECE);
      const float* row = x.data_ptr<float>() + r * V;
      const float s = sp ? sp[r] : 1.f;
      float* b = best.data() + task * k;
      int64_t* w = where.data() + task * k;
      const __m256 s8 = _mm256_set1_ps(s);
      int64_t v = v0;
      for (; v + 8 <= v1; v += 8) {
        const __m256 chunk = _mm256_mul_ps(_mm256_loadu_ps(row + v), s8);
        if (w[k - 1] < 0 || _mm256_movemask_ps(_mm256_cmp_ps(chunk, _mm256_set1_ps(b[k - 1]), _CMP_NLE_UQ))) {  // larger, or NaN
          float values[8];
          _mm256_storeu_ps(values, chunk);
          for (int j = 0; j < 8; ++j) insert_best(b, w, k, values[j], v + j);
        }
      }
      for (; v < v1; ++v) insert_best(b, w, k, row[v] * s, v);
      top[task] = b[0];
      if (b[0] == -INFINITY || std::isnan(b[0])) continue;
      __m256 sum8 = _mm256_setzero_ps();
      for (v = v0; v + 8 <= v1; v += 8)
        sum8 = _mm256_add_ps(sum8, exp_lanes(_mm256_sub_ps(_mm256_mul_ps(_mm256_loadu_ps(row + v), s8), _mm256_set1_ps(b[0]))));
      float sum = hsum(sum8);
      for (; v < v1; ++v) sum += exp1(row[v] * s - b[0]);
      sums[task] = sum;
    }
  });
  auto values = torch::empty({R, k}, x.options());
  auto indices = torch::empty({R, k}, x.options().dtype(at::kLong));
  auto lses = torch::empty({R}, x.options());
  for (int64_t r = 0; r < R; ++r) {  // the pieces in order: a tie keeps the lower index first
    float* b = values.data_ptr<float>() + r * k;
    int64_t* w = indices.data_ptr<int64_t>() + r * k;
    std::fill_n(b, k, -INFINITY), std::fill_n(w, k, -1);
    float most = -INFINITY;
    for (int64_t piece = r * pieces; piece < (r + 1) * pieces; ++piece) {
      most = above(top[piece], most) ? top[piece] : most;
      for (int64_t j = 0; j < k && where[piece * k + j] >= 0; ++j)
        if (!insert_best(b, w, k, best[piece * k + j], where[piece * k + j])) break;  // the piece's next ones are no larger
    }
    float sum = 0.f;
    for (int64_t piece = r * pieces; most != -INFINITY && piece < (r + 1) * pieces; ++piece)
      if (top[piece] != -INFINITY) sum += sums[piece] * exp1(top[piece] - most);  // a NaN makes the sum NaN
    lses.data_ptr<float>()[r] = most + std::log(sum);
  }
  return {values, indices, lses};
}

inline float sum_of(const float* x, int64_t n) {  // 8 lanes, then their fixed-order sum, then the tail
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + i));
  float s = hsum(acc);
  for (; i < n; ++i) s += x[i];
  return s;
}

// An inverse-CDF draw from weights w [V] (>= 0, need not sum to 1): the first token whose running
// sum exceeds u times the total, or -1 if every weight is 0. The sums run in one fixed order (blocks
// of 64 summed by `sum_of`, the blocks in turn, then token by token inside the chosen block), and
// a token of zero weight is never drawn, whatever the rounding.
int64_t draw_index(const float* w, int64_t V, float u) {
  constexpr int64_t B = 64;
  thread_local std::vector<float> sums;
  const int64_t blocks = (V + B - 1) / B;
  sums.resize(blocks);
  float total = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    const float* x = w + b * B;
    const int64_t n = std::min(B, V - b * B);
    sums[b] = sum_of(x, n);
    total += sums[b];
  }
  if (!(total > 0.f)) return -1;
  const float target = u * total;
  float run = 0.f;
  int64_t b = 0;
  for (; b < blocks - 1 && !(run + sums[b] > target); ++b) run += sums[b];
  const int64_t end = std::min(V, (b + 1) * B);
  int64_t last = -1;  // the last token of weight > 0 seen: rounding may leave the target past the block's own sum
  for (int64_t t = b * B; t < end; ++t) {
    if (w[t] > 0.f) {
      last = t;
      run += w[t];
      if (run > target) return t;
    }
  }
  for (int64_t t = b * B - 1; last < 0 && t >= 0; --t)
    if (w[t] > 0.f) last = t;
  return last;
}

// Per row of probs [R, V] (fp32, need not be normalised): an inverse-CDF draw with uniform u[r].
torch::Tensor sample(const torch::Tensor& probs, const torch::Tensor& u) {
  TORCH_CHECK(probs.dim() == 2 && probs.scalar_type() == at::kFloat && probs.is_contiguous() &&
                  u.scalar_type() == at::kFloat && u.numel() == probs.size(0),
              "sample: contiguous fp32 probs [R, V] and fp32 uniforms [R]");
  const int64_t R = probs.size(0), V = probs.size(1);
  auto us = u.contiguous();
  auto out = torch::empty({R}, probs.options().dtype(at::kLong));
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t t = draw_index(probs.data_ptr<float>() + r * V, V, us.data_ptr<float>()[r]);
      out.data_ptr<int64_t>()[r] = t < 0 ? V - 1 : t;
    }
  });
  return out;
}

// The speculative rule's last step (sampling.speculative_accept's tail), per row n after its
// accepted drafts a = accepted[n] of lengths[n]: where a draft was rejected, the residual
// r = max(p[n, a] - q[n, a], 0) (p[n, a] itself if r has no mass) and the leaves of that position
// (depth a + 1, an earlier repeat skipped) tried in turn, leaf s taken with probability r(leaf) / the
// mass the refused ones before it left; the next token from the taken leaf's row p[n, K + 1 + s],
// else from r without the refused leaves, or from p[n, a] where every draft was accepted (the bonus).
// p [N, R, V] and q [N, K, V] fp32 with contiguous rows; leaves [N, S]. Returns (next token, leaf or -1).
std::vector<torch::Tensor> residual_draw(const torch::Tensor& p, const torch::Tensor& q, const torch::Tensor& accepted,
                                         const torch::Tensor& lengths, const torch::Tensor& leaf_tokens,
                                         const torch::Tensor& leaf_depths, const torch::Tensor& u_leaves,
                                         const torch::Tensor& u_next) {
  TORCH_CHECK(p.dim() == 3 && q.dim() == 3 && p.scalar_type() == at::kFloat && q.scalar_type() == at::kFloat &&
                  p.stride(2) == 1 && q.stride(2) == 1 && q.size(2) == p.size(2),
              "residual_draw: fp32 p [N, R, V] and q [N, K, V] with contiguous rows");
  const int64_t N = p.size(0), V = p.size(2), K = q.size(1), S = leaf_tokens.size(1);
  auto a_ = accepted.contiguous(), len_ = lengths.contiguous(), tok_ = leaf_tokens.contiguous(),
       dep_ = leaf_depths.contiguous(), ul_ = u_leaves.contiguous(), un_ = u_next.contiguous();
  TORCH_CHECK(a_.scalar_type() == at::kLong && len_.scalar_type() == at::kLong && tok_.scalar_type() == at::kLong &&
                  dep_.scalar_type() == at::kLong && ul_.scalar_type() == at::kFloat && un_.scalar_type() == at::kFloat &&
                  leaf_depths.size(1) == S && u_leaves.size(1) >= S,
              "residual_draw: long accepted, lengths, leaves and fp32 uniforms");
  auto next = torch::empty({N}, a_.options()), leaf = torch::full({N}, -1, a_.options());
  const int64_t *acc = a_.data_ptr<int64_t>(), *len = len_.data_ptr<int64_t>(), *tok = tok_.data_ptr<int64_t>(),
                *dep = dep_.data_ptr<int64_t>();
  const float *ul = ul_.data_ptr<float>(), *un = un_.data_ptr<float>();
  const int64_t uls = ul_.size(1);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t a = acc[n];
    const float* pa = p.data_ptr<float>() + n * p.stride(0) + a * p.stride(1);
    const float* from = pa;
    int64_t taken = -1;
    thread_local std::vector<float> r;
    if (a < len[n]) {
      const float* qa = q.data_ptr<float>() + n * q.stride(0) + std::min(a, K - 1) * q.stride(1);
      r.resize(V);
      int64_t t = 0;
      for (; t + 8 <= V; t += 8)
        _mm256_storeu_ps(r.data() + t, _mm256_max_ps(_mm256_sub_ps(_mm256_loadu_ps(pa + t), _mm256_loadu_ps(qa + t)), _mm256_setzero_ps()));
      for (; t < V; ++t) r[t] = std::max(pa[t] - qa[t], 0.f);
      float total = sum_of(r.data(), V);
      if (!(total > 0.f)) {  // p == q: nothing to correct
        std::copy(pa, pa + V, r.begin());
        total = sum_of(pa, V);
      }
      const int64_t *tn = tok + n * S, *dn = dep + n * S;
      float before = 0.f;  // the mass of the leaves tried so far
      std::vector<int64_t> refused;
      for (int64_t s = 0; s < S && taken < 0; ++s) {
        if (dn[s] != a + 1 || std::find(refused.begin(), refused.end(), tn[s]) != refused.end()) continue;
        const float m = r[tn[s]];
        if (ul[n * uls + s] * (total - before) < m) taken = s;
        else before += m, refused.push_back(tn[s]);
      }
      if (taken >= 0) from = p.data_ptr<float>() + n * p.stride(0) + (K + 1 + taken) * p.stride(1);
      else {
        for (int64_t t : refused) r[t] = 0.f;
        from = r.data();
      }
    }
    int64_t t = draw_index(from, V, un[n]);
    if (t < 0) t = draw_index(pa, V, un[n]);  // rounding left the residual no mass (exact arithmetic never does)
    next.data_ptr<int64_t>()[n] = t < 0 ? V - 1 : t;
    leaf.data_ptr<int64_t>()[n] = taken;
  }
  return {next, leaf};
}

// Rotary embedding in place on x [N, T, H, D] (D contiguous): x * cos + rotate_half(x) * sin with
// cos, sin [N, T, D] fp32, computed in fp32 (two products and a sum, as aten does in fp32).
template <typename T>
void rope_impl(T* x, const float* cos, const float* sin, int64_t NT, int64_t T_, int64_t H, int64_t D, int64_t sn,
               int64_t st) {
  // x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]); each half read before
  // either is written. 8 lanes at a time where a half holds whole groups of 8, same ops as one.
  const int64_t half = D / 2, vectored = half % 8 ? 0 : half;
  at::parallel_for(0, NT, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i)
      for (int64_t h = 0; h < H; ++h) {
        T* p = x + (i / T_) * sn + (i % T_) * st + h * D;
        const float* c = cos + i * D;
        const float* s = sin + i * D;
        for (int64_t d = 0; d < vectored; d += 8) {
          const __m256 lo = load8(p + d), hi = load8(p + half + d);
          const __m256 neg_hi = _mm256_xor_ps(hi, _mm256_set1_ps(-0.f));
          const __m256 out_lo = _mm256_add_ps(_mm256_mul_ps(lo, load8(c + d)), _mm256_mul_ps(neg_hi, load8(s + d)));
          const __m256 out_hi =
              _mm256_add_ps(_mm256_mul_ps(hi, load8(c + half + d)), _mm256_mul_ps(lo, load8(s + half + d)));
          store8(round_lanes(out_lo, p), p + d);
          store8(round_lanes(out_hi, p), p + half + d);
        }
        for (int64_t d = vectored; d < half; ++d) {
          const float lo = to_float(p[d]), hi = to_float(p[half + d]);
          store(lo * c[d] + -hi * s[d], p + d);
          store(hi * c[half + d] + lo * s[half + d], p + half + d);
        }
      }
  });
}

void rope_(torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin) {
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && x.stride(2) == x.size(3), "rope: x [N, T, H, D] with heads packed");
  TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
              cos.numel() == x.size(0) * x.size(1) * x.size(3) && sin.sizes() == cos.sizes(), "rope: cos, sin fp32 [N, T, D]");
  const int64_t NT = x.size(0) * x.size(1), H = x.size(2), D = x.size(3);
  if (x.scalar_type() == at::kFloat)
    rope_impl(x.data_ptr<float>(), cos.data_ptr<float>(), sin.data_ptr<float>(), NT, x.size(1), H, D, x.stride(0), x.stride(1));
  else if (x.scalar_type() == at::kBFloat16)
    rope_impl(x.data_ptr<bf16>(), cos.data_ptr<float>(), sin.data_ptr<float>(), NT, x.size(1), H, D, x.stride(0), x.stride(1));
  else
    TORCH_CHECK(false, "rope: fp32 or bf16");
}

// ---- the decoder stack in one call: every layer of a pass with no Python between the ops ----
//
// The same ops, in the same order and precision, as the model's layers on the plain path: per
// layer RMSNorm, q/k/v (+ biases, QK-norms), RoPE, the cache write, attention over the cache, o
// and the residual, RMSNorm, gate/up, SiLU * up, down and the residual. Activations are stored in
// the model's dtype between ops (rounded where the plain path rounds) and products accumulate in
// fp32. The products and the attention run on both cores; SiLU * up and the residual adds in the
// products' epilogues, by the thread that computed their operands; the other small ops of a few
// tokens run inline (they cost less than waking a thread).

struct Weight {  // a product's weight, packed; with its scales when int8
  torch::Tensor packed, scale;
};
inline Operand operand(const Weight& w, const torch::Tensor* bias = nullptr) { return {&w.packed, &w.scale, bias}; }

// One view's weights: its attention's q, k, v, o (optional fp32 biases and QK-norm weights) and the
// MLP's gate and up (as one weight, `interleave_panels`) and down, shared by the views unless the
// drafts take quantized copies.
struct ViewWeights {
  Weight q, k, v, o, gate_up, down;
  torch::Tensor q_bias, k_bias, v_bias, q_norm, k_norm;
};

struct LayerWeights {
  torch::Tensor input_norm, post_norm;
  ViewWeights ar, diffusion;
};

// out = silu(gate) * up over n values, each operand and result rounded to T as the plain path
// stores them; the last partial group of 8 runs through the same lanes (zero-padded), so every
// value gets the same bits wherever it sits. AVX-512 builds take 16 values at a time first: the
// same operations lane for lane (a bf16 pass of 8 tokens 0.975x, the draft pass 0.985x, a 64-token
// prefill pass 0.983x; `kernel_ab.py`, 2026-11-27, Zen 5).
template <typename V, typename T>
inline V silu_mul_lanes(V gate, V up, T* like) {
  const V g = round_lanes(gate, like);
  const V e = exp_lanes(splat<V>(0.f) - g);
  const V a = round_lanes(g / (splat<V>(1.f) + e), like);
  return round_lanes(a * round_lanes(up, like), like);
}

template <typename T>
void silu_mul(const float* gate, const float* up, T* out, int64_t n) {
  int64_t i = 0;
#ifdef __AVX512F__
  for (; i + 16 <= n; i += 16) store16(silu_mul_lanes(_mm512_loadu_ps(gate + i), _mm512_loadu_ps(up + i), out), out + i);
#endif
  for (; i + 8 <= n; i += 8) store8(silu_mul_lanes(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i), out), out + i);
  if (i < n) {
    float g8[8] = {}, u8[8] = {}, y8[8];
    std::copy(gate + i, gate + n, g8), std::copy(up + i, up + n, u8);
    _mm256_storeu_ps(y8, silu_mul_lanes(_mm256_loadu_ps(g8), _mm256_loadu_ps(u8), out));
    for (int64_t j = 0; i + j < n; ++j) store(y8[j], out + i + j);  // exact: already rounded
  }
}

// gate [I, C] and up [I, C] as one weight [2I, C], panel by panel: gate's features [16p, 16p + 16),
// then up's, for every whole panel; then the rest of gate's, then the rest of up's. A thread that
// computes a panel pair holds both operands of SiLU(gate) * up for its 16 features, and computes
// them there (`Epilogue`): no pass over the outputs after the product, and no thread to wake for it
// (a bf16 pass of 7 tokens spent 0.12-0.22 ms on SiLU * up alone, the draft pass 0.07-0.16;
// `benchmarks/pass_phases.py`, 2026-11-27, Zen 5).
torch::Tensor interleave_panels(const torch::Tensor& gate, const torch::Tensor& up) {
  const int64_t I = gate.size(0), C = gate.size(1), paired = I / PANEL * PANEL;
  const auto panels = [&](const torch::Tensor& w) { return w.narrow(0, 0, paired).reshape({paired / PANEL, 1, PANEL, C}); };
  const auto pairs = torch::cat({panels(gate), panels(up)}, 1).reshape({2 * paired, C});
  return torch::cat({pairs, gate.narrow(0, paired, I - paired), up.narrow(0, paired, I - paired)}).contiguous();
}

// Where a pass's time goes, phase by phase, when built with -DORTHRUS_PHASES
// (`benchmarks/pass_phases.py`); the normal build has none of this.
#ifdef ORTHRUS_PHASES
enum Phase { SMALL_OPS, QKV, ATTENTION, O_PROJ, GATE_UP, DOWN, PHASES };
double phase_ms[PHASES] = {};
struct PhaseClock {  // adds the time since the last tick to the phase that was running
  std::chrono::steady_clock::time_point last = std::chrono::steady_clock::now();
  Phase running = SMALL_OPS;
  void tick(Phase next) {
    const auto now = std::chrono::steady_clock::now();
    phase_ms[running] += std::chrono::duration<double, std::milli>(now - last).count();
    last = now, running = next;
  }
  ~PhaseClock() { tick(SMALL_OPS); }
};
std::vector<double> take_phases() {  // ms per phase since the last call: small ops, qkv, attention, o, gate/up, down
  std::vector<double> taken(phase_ms, phase_ms + PHASES);
  std::fill_n(phase_ms, PHASES, 0.0);
  return taken;
}
#define PHASE_CLOCK PhaseClock phase_clock
#define PHASE(p) phase_clock.tick(p)
#else
#define PHASE_CLOCK
#define PHASE(p)
#endif

class DecoderStack {
 public:
  // layers: per layer [input_norm, post_norm, gate, up, down] then, for the AR view and then the
  // diffusion view, [q, k, v, o, q_bias, k_bias, v_bias, q_norm, k_norm] (None where absent), as
  // the model holds them (unpacked). `fresh` tells whether they are still what the model holds.
  // `int8_drafts`: the diffusion view (the drafts) multiplies by quantized copies of its weights
  // (`draft_weight`: 4-bit where they are 4-bit, else int8), a third to a half of bf16's bytes to
  // stream; the AR view, which verifies, keeps the model's own.
  DecoderStack(const std::vector<std::vector<c10::optional<torch::Tensor>>>& layers, int64_t heads, int64_t kv_heads,
               int64_t head_dim, double eps, bool int8_drafts)
      : heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), eps_(static_cast<float>(eps)) {
    auto get = [&](const std::vector<c10::optional<torch::Tensor>>& l, size_t i) -> torch::Tensor {
      if (!l[i] || !l[i]->defined()) return {};
      const torch::Tensor& t = *l[i];
      sources_.push_back(t);
      versions_.push_back(t._version());
      pointers_.push_back(t.data_ptr());
      return t.detach().contiguous();
    };
    auto weight = [](const torch::Tensor& t, bool int8) -> Weight {
      if (!int8) return {pack(t), {}};
      const auto q = draft_weight(t);
      return {q[0], q[1]};
    };
    auto product = [&](const std::vector<c10::optional<torch::Tensor>>& l, size_t i, bool int8) {
      return weight(get(l, i), int8);
    };
    for (const auto& l : layers) {
      TORCH_CHECK(l.size() == 23, "DecoderStack: 23 entries per layer");
      LayerWeights w;
      w.input_norm = get(l, 0);
      w.post_norm = get(l, 1);
      for (int v = 0; v < 2; ++v) {
        ViewWeights& a = v == 0 ? w.ar : w.diffusion;
        const bool int8 = v == 1 && int8_drafts;
        const size_t b = 5 + 9 * v;
        if (v == 0 || int8) {
          a.gate_up = weight(interleave_panels(get(l, 2), get(l, 3)), int8);
          a.down = product(l, 4, int8);
        } else {
          a.gate_up = w.ar.gate_up, a.down = w.ar.down;  // shared, not copied
        }
        a.q = product(l, b, int8);
        a.k = product(l, b + 1, int8);
        a.v = product(l, b + 2, int8);
        a.o = product(l, b + 3, int8);
        for (auto [dst, i] : {std::pair{&a.q_bias, b + 4}, {&a.k_bias, b + 5}, {&a.v_bias, b + 6}}) {
          *dst = get(l, i);
          if (dst->defined()) *dst = dst->to(at::kFloat).contiguous();
        }
        a.q_norm = get(l, b + 7);
        a.k_norm = get(l, b + 8);
      }
      layers_.push_back(std::move(w));
    }
    dtype_ = layers_.at(0).post_norm.scalar_type();
    intermediate_ = layers.at(0)[2]->size(0);
  }

  bool fresh() const {  // in-place updates move the version, `.data` swaps the pointer
    for (size_t i = 0; i < sources_.size(); ++i)
      if (sources_[i]._version() != versions_[i] || sources_[i].data_ptr() != pointers_[i]) return false;
    return true;
  }

  // x [N, T, hidden] (the embeddings, model dtype, contiguous) -> the last layer's output, same
  // shape. cos, sin fp32 [N, T, head_dim]; k_cache, v_cache [layers, rows, kv_heads, S, head_dim];
  // sequence n is cache row rows[n], its tokens go to slots starts[n] ..; query (n, t) sees keys
  // [0, limits[n, t]), the last one in slot lasts[n, t] (limits[n, t] - 1 but in a token tree's leaves).
  torch::Tensor forward(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin,
                        const torch::Tensor& k_cache, const torch::Tensor& v_cache, const torch::Tensor& rows,
                        const torch::Tensor& starts, const torch::Tensor& limits, const torch::Tensor& lasts,
                        bool diffusion) const {
    TORCH_CHECK(x.dim() == 3 && x.is_contiguous() && x.scalar_type() == dtype_, "DecoderStack: contiguous x [N, T, hidden] in the weights' dtype");
    TORCH_CHECK(k_cache.scalar_type() == dtype_ && k_cache.dim() == 5 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes() &&
                v_cache.is_contiguous() && k_cache.size(0) == static_cast<int64_t>(layers_.size()) &&
                k_cache.size(2) == kv_heads_ && k_cache.size(4) == head_dim_, "DecoderStack: the cache's layout");
    const int64_t N = x.size(0), T = x.size(1);
    TORCH_CHECK(cos.scalar_type() == at::kFloat && cos.is_contiguous() && sin.is_contiguous() &&
                cos.numel() == N * T * head_dim_ && sin.sizes() == cos.sizes(), "DecoderStack: cos, sin fp32 [N, T, head_dim]");
    auto r = rows.to(at::kLong).contiguous(), st = starts.to(at::kLong).contiguous(), lim = limits.to(at::kLong).contiguous(),
         la = lasts.to(at::kLong).contiguous();
    TORCH_CHECK(r.numel() == N && st.numel() == N && lim.numel() == N * T && la.numel() == N * T,
                "DecoderStack: rows [N], starts [N], limits and lasts [N, T]");
    const int64_t *rp = r.data_ptr<int64_t>(), *sp = st.data_ptr<int64_t>(), *lp = lim.data_ptr<int64_t>(), *ap = la.data_ptr<int64_t>();
    const int64_t S = k_cache.size(3);
    for (int64_t n = 0; n < N; ++n) {
      TORCH_CHECK(rp[n] >= 0 && rp[n] < k_cache.size(1) && sp[n] >= 0 && sp[n] + T <= S, "DecoderStack: a row or position out of the cache");
      for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(lp[n * T + t] >= 1 && lp[n * T + t] <= S && ap[n * T + t] >= lp[n * T + t] - 1 && ap[n * T + t] < sp[n] + T,
                    "DecoderStack: limits in [1, S], lasts in [limit - 1, start + T)");
    }
    auto out = x.clone();
    if (dtype_ == at::kFloat)
      run<float>(out.data_ptr<float>(), N, T, cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache.data_ptr<float>(),
                 v_cache.data_ptr<float>(), k_cache.strides(), rp, sp, lp, ap, diffusion);
    else
      run<bf16>(out.data_ptr<bf16>(), N, T, cos.data_ptr<float>(), sin.data_ptr<float>(), k_cache.data_ptr<bf16>(),
                v_cache.data_ptr<bf16>(), k_cache.strides(), rp, sp, lp, ap, diffusion);
    return out;
  }

 private:
  template <typename T>
  void run(T* x, int64_t N, int64_t T_, const float* cos, const float* sin, T* kc, T* vc, at::IntArrayRef cs,
           const int64_t* rows, const int64_t* starts, const int64_t* limits, const int64_t* lasts, bool diffusion) const {
    const int64_t M = N * T_, C = layers_[0].post_norm.numel(), I = intermediate_;
    const int64_t H = heads_, G = kv_heads_, D = head_dim_, QD = H * D, KD = G * D;
    const float scale = 1.f / std::sqrt(static_cast<float>(D));
    // the products take their inputs in T (h, act); attention its queries in fp32 (hf in, qf out)
    std::vector<T> h(M * std::max(C, QD)), q(M * QD), k(M * KD), v(M * KD), act(M * I);
    std::vector<float> hf(M * QD), qf(M * QD), kf(M * KD), vf(M * KD), yf(M * std::max(C, 2 * I));
    // 16 lanes at a time on AVX-512 builds, then 8, the last few one by one: the same roundings
    // (to nearest, ties to even) lane for lane (an 8-token bf16 pass 0.974x against 8 at a time,
    // the draft pass 0.990x; `kernel_ab.py`, 2026-11-27, Zen 5)
    auto round_into = [](const float* src, T* dst, int64_t n) {
      int64_t i = 0;
#ifdef __AVX512F__
      for (; i + 16 <= n; i += 16) store16(round_lanes(_mm512_loadu_ps(src + i), dst), dst + i);
#endif
      for (; i + 8 <= n; i += 8) store8(round_lanes(_mm256_loadu_ps(src + i), dst), dst + i);
      for (; i < n; ++i) store(src[i], dst + i);
    };
    auto add_into = [](T* x, const float* y, int64_t n) {  // x += round(y), as x + y in x's dtype
      int64_t i = 0;
#ifdef __AVX512F__
      for (; i + 16 <= n; i += 16) store16(round_lanes(_mm512_add_ps(load16(x + i), round_lanes(_mm512_loadu_ps(y + i), x)), x), x + i);
#endif
      for (; i + 8 <= n; i += 8) store8(round_lanes(_mm256_add_ps(load8(x + i), round_lanes(_mm256_loadu_ps(y + i), x)), x), x + i);
      for (; i < n; ++i) store(to_float(x[i]) + to_float(static_cast<T>(y[i])), x + i);
    };
    const int64_t paired = I / PANEL * PANEL;  // gate/up features in panel pairs (`interleave_panels`)
    const Epilogue silu_after = [&](size_t, int64_t n0, int64_t n1) {  // SiLU * up of the pairs in [n0, n1), and the rest with the last
      for (int64_t m = 0; m < M; ++m) {
        const float* y = yf.data() + m * 2 * I;
        auto act_of = [&](int64_t gate_at, int64_t up_at, int64_t at, int64_t n) {
          silu_mul(y + gate_at, y + up_at, act.data() + m * I + at, n);
        };
        for (int64_t f = n0; f < std::min(n1, 2 * paired); f += 2 * PANEL) act_of(f, f + PANEL, f / 2, PANEL);  // runs start at even panels
        if (n1 == 2 * I && paired < I) act_of(2 * paired, paired + I, paired, I - paired);
      }
    };
    const Epilogue add_after = [&](size_t, int64_t n0, int64_t n1) {  // the residual: x += round(y) over [n0, n1)
      for (int64_t m = 0; m < M; ++m) add_into(x + m * C + n0, yf.data() + m * C + n0, n1 - n0);
    };
    PHASE_CLOCK;
    for (size_t l = 0; l < layers_.size(); ++l) {
      const LayerWeights& w = layers_[l];
      const ViewWeights& a = diffusion ? w.diffusion : w.ar;
      rmsnorm_impl(x, w.input_norm.data_ptr<T>(), h.data(), M, C, eps_);
      PHASE(QKV);
      products(h.data(), M, C, {operand(a.q, &a.q_bias), operand(a.k, &a.k_bias), operand(a.v, &a.v_bias)},
               {qf.data(), kf.data(), vf.data()});
      PHASE(SMALL_OPS);
      round_into(qf.data(), q.data(), M * QD);
      round_into(kf.data(), k.data(), M * KD);
      round_into(vf.data(), v.data(), M * KD);
      if (a.q_norm.defined()) {
        rmsnorm_impl(q.data(), a.q_norm.data_ptr<T>(), q.data(), M * H, D, eps_);
        rmsnorm_impl(k.data(), a.k_norm.data_ptr<T>(), k.data(), M * G, D, eps_);
      }
      rope_impl(q.data(), cos, sin, M, T_, H, D, T_ * QD, QD);
      rope_impl(k.data(), cos, sin, M, T_, G, D, T_ * KD, KD);
      T* kl = kc + l * cs[0];
      T* vl = vc + l * cs[0];
      for (int64_t n = 0; n < N; ++n)
        for (int64_t t = 0; t < T_; ++t)
          for (int64_t g = 0; g < G; ++g) {
            const int64_t at = rows[n] * cs[1] + g * cs[2] + (starts[n] + t) * cs[3], from = (n * T_ + t) * KD + g * D;
            std::copy_n(k.data() + from, D, kl + at);
            std::copy_n(v.data() + from, D, vl + at);
          }
      widen(q.data(), M * QD, hf.data());
      PHASE(ATTENTION);
      attend_raw<T>(hf.data(), N, T_, H, G, D, kl, vl, cs[1], cs[2], cs[3], rows, limits, lasts, scale, qf.data());
      PHASE(SMALL_OPS);
      round_into(qf.data(), h.data(), M * QD);  // the heads' output, in the model's dtype
      PHASE(O_PROJ);
      products(h.data(), M, QD, {operand(a.o)}, {yf.data()}, &add_after);
      PHASE(SMALL_OPS);
      rmsnorm_impl(x, w.post_norm.data_ptr<T>(), h.data(), M, C, eps_);
      PHASE(GATE_UP);
      products(h.data(), M, C, {operand(a.gate_up)}, {yf.data()}, &silu_after);
      PHASE(DOWN);
      products(act.data(), M, I, {operand(a.down)}, {yf.data()}, &add_after);
      PHASE(SMALL_OPS);
    }
  }

  std::vector<LayerWeights> layers_;
  std::vector<torch::Tensor> sources_;
  std::vector<uint32_t> versions_;
  std::vector<const void*> pointers_;
  int64_t heads_, kv_heads_, head_dim_, intermediate_;
  float eps_;
  at::ScalarType dtype_;
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
#ifdef __AMX_BF16__
  // Linux lets a process use the tile registers only once it asks (arch_prctl ARCH_REQ_XCOMP_PERM for
  // XTILEDATA, feature 18); the ask covers every thread of the process
  TORCH_CHECK(syscall(SYS_arch_prctl, 0x1023, 18) == 0, "this system does not let the process use AMX tiles");
#endif
#ifdef ORTHRUS_PHASES
  m.def("take_phases", &take_phases, "ms per phase of the decoder stack since the last call");
#endif
  m.def("pack", &pack, "a weight [N, K] in the layout `linear` reads");
  m.def("draft_weight", &draft_weight, "a weight [N, K] for drafts: packed 4-bit where it is 4-bit, else int8 and its fp32 scales [N]");
  m.def("linear", &linear, "few-row, batch-invariant x @ w.T (+ bias) for one or more packed weights",
        py::call_guard<py::gil_scoped_release>());
  m.def("rmsnorm", &rmsnorm, "RMSNorm over the last dimension");
  m.def("top_tokens", &top_tokens, "per row (times its scale): the k largest values, their indices, and the log-sum-exp",
        py::arg("x"), py::arg("k"), py::arg("scales") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("rope_", &rope_, "rotary embedding in place");
  m.def("sample", &sample, "per row: an inverse-CDF draw from (unnormalised) probabilities",
        py::call_guard<py::gil_scoped_release>());
  m.def("residual_draw", &residual_draw, "the speculative rule's next token and accepted leaf, per row",
        py::call_guard<py::gil_scoped_release>());
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<const std::vector<std::vector<c10::optional<torch::Tensor>>>&, int64_t, int64_t, int64_t, double, bool>())
      .def("fresh", &DecoderStack::fresh, "whether every weight is unchanged since the stack was built")
      // a pass runs without the GIL, so a server's event loop (another thread) keeps answering meanwhile
      .def("forward", &DecoderStack::forward, "every decoder layer of one pass", py::call_guard<py::gil_scoped_release>());
}
