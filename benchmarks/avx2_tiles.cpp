// Standalone: how the AVX2 build's product tiles (fp32 FMAs; bf16 weights widened exactly) spend
// their time, by rows and tile plan: streaming a model's worth of weights on 2 threads, and over one
// group held in cache (arithmetic alone). A plan is the row tiles a group of 4 panels ([K][16] each,
// one after the other, the kernels' AVX2 layout) passes through: "4x1 4x1" = two tiles of 4 rows
// over one panel at a time. "8h" = 8 rows over half a panel's features at a time (both halves in
// turn); "P 4x1 4x1" = the plan one panel at a time; "1p4" = 1 row over 4 panels, asking for the
// weights ahead as the tiles of more rows do ("1x4" leaves it to the hardware prefetchers). Each round times every plan once; ratios to the 1-row plan of the same round are read.
//
//   g++ -O3 -fopenmp -mavx2 -mfma -ffp-contract=off benchmarks/avx2_tiles.cpp -o /tmp/avx2_tiles
//   /tmp/avx2_tiles 15 bf16 576      (rounds, weight dtype bf16|fp32, K)
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

constexpr int PANEL = 16, GROUP = 4;
constexpr int64_t PF = 8192;
static bool BF16 = true;
static int64_t K = 576;

inline void load16(const float* p, __m256& lo, __m256& hi) { lo = _mm256_loadu_ps(p), hi = _mm256_loadu_ps(p + 8); }
inline void load16(const uint16_t* p, __m256& lo, __m256& hi) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))));
}
inline __m256 load8(const float* p, int half) { return _mm256_loadu_ps(p + 8 * half); }
inline __m256 load8(const uint16_t* p, int half) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm256_castsi256_ps(half ? _mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u)))
                                  : _mm256_slli_epi32(v, 16));
}

// the kernels' tile (`linear_tile`, AVX2): R rows over S whole panels, inputs two at a time
template <typename W, int R, int S, bool PREFETCH = (R > 1)>
__attribute__((noinline)) void tile(const float* x, int64_t K, const W* const* w, float* y) {
  __m256 acc[R][2 * S] = {};
  auto input = [&](int64_t k) {
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) {
      __m256 lo, hi;
      load16(w[s] + k * PANEL, lo, hi);
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const __m256 xk = _mm256_broadcast_ss(x + r * K + k);
        acc[r][2 * s] = _mm256_fmadd_ps(xk, lo, acc[r][2 * s]);
        acc[r][2 * s + 1] = _mm256_fmadd_ps(xk, hi, acc[r][2 * s + 1]);
      }
    }
  };
  for (int64_t n = 0; n + 2 <= K; n += 2) {
    if constexpr (PREFETCH)
      for (int s = 0; s < S; ++s)
        for (int64_t b = 0; b < 2 * PANEL * (int64_t)sizeof(W); b += 64)
          _mm_prefetch(reinterpret_cast<const char*>(w[s] + n * PANEL) + PF + b, _MM_HINT_T1);
    input(n + 1);
    input(n);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int s = 0; s < 2 * S; ++s) _mm256_storeu_ps(y + (r * 2 * S + s) * 8, acc[r][s]);
}

// R rows over half of one panel's features (the same chains; the other half on a second pass)
template <typename W, int R>
__attribute__((noinline)) void half_tile(const float* x, int64_t K, const W* w, int half, float* y) {
  __m256 acc[R] = {};
  auto input = [&](int64_t k) {
    const __m256 wk = load8(w + k * PANEL, half);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(x + r * K + k), wk, acc[r]);
  };
  for (int64_t n = 0; n + 2 <= K; n += 2) {
    if (half == 0)
      for (int64_t b = 0; b < 2 * PANEL * (int64_t)sizeof(W); b += 64)
        _mm_prefetch(reinterpret_cast<const char*>(w + n * PANEL) + PF + b, _MM_HINT_T1);
    input(n + 1);
    input(n);
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * 8, acc[r]);
}

template <typename W, int R, int S, bool PREFETCH = (R > 1)>
void run_tiles(const float* x, const W* group, int first, int last, float* y) {  // R rows, panels first..last-1, S at a time
  for (int s = first; s < last; s += S) {
    const W* w[S];
    for (int i = 0; i < S; ++i) w[i] = group + (s + i) * PANEL * K;
    tile<W, R, S, PREFETCH>(x, K, w, y);
  }
}

// A plan's tiles over panels first..last-1 of the group: each tile passes over all of them in turn.
template <typename W>
void run_span(const std::string& plan, const float* x, const W* group, int first, int last, float* y) {
  int row = 0;
  for (size_t i = 0; i < plan.size(); i += 4) {
    const std::string t = plan.substr(i, 3);
    const float* xr = x + row * K;
    if (t == "1x1") run_tiles<W, 1, 1>(xr, group, first, last, y), row += 1;
    else if (t == "1x4") run_tiles<W, 1, 4>(xr, group, first, last, y), row += 1;
    else if (t == "1p1") run_tiles<W, 1, 1, true>(xr, group, first, last, y), row += 1;
    else if (t == "1x2") run_tiles<W, 1, 2>(xr, group, first, last, y), row += 1;
    else if (t == "1p2") run_tiles<W, 1, 2, true>(xr, group, first, last, y), row += 1;
    else if (t == "1p4") run_tiles<W, 1, 4, true>(xr, group, first, last, y), row += 1;
    else if (t == "2x1") run_tiles<W, 2, 1>(xr, group, first, last, y), row += 2;
    else if (t == "2x2") run_tiles<W, 2, 2>(xr, group, first, last, y), row += 2;
    else if (t == "3x1") run_tiles<W, 3, 1>(xr, group, first, last, y), row += 3;
    else if (t == "3x2") run_tiles<W, 3, 2>(xr, group, first, last, y), row += 3;
    else if (t == "4x1") run_tiles<W, 4, 1>(xr, group, first, last, y), row += 4;
    else if (t == "5x1") run_tiles<W, 5, 1>(xr, group, first, last, y), row += 5;
    else if (t == "6x1") run_tiles<W, 6, 1>(xr, group, first, last, y), row += 6;
    else if (t == "8h ") {
      for (int s = first; s < last; ++s)
        for (int h = 0; h < 2; ++h) half_tile<W, 8>(xr, K, group + s * PANEL * K, h, y);
      row += 8;
    } else { fprintf(stderr, "unknown tile %s\n", t.c_str()); exit(1); }
  }
}

// "P " before a plan: the whole plan one panel at a time (the panel stays in L1/L2 between tiles).
template <typename W>
void run_plan(const std::string& plan, const float* x, const W* group, float* y) {
  if (plan.rfind("P ", 0) == 0)
    for (int s = 0; s < GROUP; ++s) run_span<W>(plan.substr(2), x, group, s, s + 1, y);
  else
    run_span<W>(plan, x, group, 0, GROUP, y);
}

template <typename W>
double timed(const std::string& plan, const std::vector<W>& w, int64_t groups, bool cached, const std::vector<float>& x) {
  const int64_t group_len = (int64_t)GROUP * PANEL * K;
  const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(2)
  {
    alignas(64) float y[16 * 64];
    const int t = omp_get_thread_num();
#pragma omp for schedule(static)
    for (int64_t g = 0; g < groups; ++g)
      run_plan<W>(plan, x.data(), w.data() + (cached ? t : g) * group_len, y);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

template <typename W>
void bench(int rounds) {
  const std::vector<std::string> plans = {
      "1x4", "1p1", "2x2", "2x1", "3x2", "3x1", "4x1", "5x1", "6x1", "4x1 2x1", "4x1 2x2", "5x1 2x1", "5x1 2x2",
      "6x1 1p1", "4x1 4x1", "6x1 2x1", "5x1 5x1 2x1", "6x1 6x1", "5x1 5x1 5x1 1p1", "6x1 6x1 4x1"};
  const int64_t group_len = (int64_t)GROUP * PANEL * K;
  const int64_t groups = (268LL << 20) / (group_len * (int64_t)sizeof(W));
  std::vector<W> w(groups * group_len);
  for (size_t i = 0; i < w.size(); ++i) {
    const float v = 0.01f * ((i * 2654435761u) % 200) - 1.0f;
    if constexpr (sizeof(W) == 2) { uint32_t b; std::memcpy(&b, &v, 4); w[i] = b >> 16; } else w[i] = v;
  }
  std::vector<float> x(16 * K);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.001f * (i % 97);
  for (bool cached : {false, true}) {
    std::vector<std::vector<double>> t(plans.size());
    for (int r = 0; r < rounds; ++r)
      for (size_t p = 0; p < plans.size(); ++p) t[p].push_back(timed<W>(plans[p], w, groups, cached, x));
    printf("%s, K=%ld, %s (%ld groups, %.0f MB)\n", sizeof(W) == 2 ? "bf16" : "fp32", (long)K,
           cached ? "one group a thread, cached" : "streaming", (long)groups, groups * group_len * sizeof(W) / 1e6);
    for (size_t p = 0; p < plans.size(); ++p) {
      int rows = 0;
      for (size_t i = plans[p][0] == 'P' ? 2 : 0; i < plans[p].size(); i += 4) rows += plans[p][i] - '0';
      std::vector<double> ratio, v = t[p];
      for (int r = 0; r < rounds; ++r) ratio.push_back(t[p][r] / t[0][r]);
      std::sort(ratio.begin(), ratio.end());
      std::sort(v.begin(), v.end());
      const double flops = 2.0 * rows * groups * group_len;
      printf("  %-18s %2d rows  median %6.2f ms  x1-row %5.2f  %5.1f GFLOP/s  %5.1f GB/s\n", plans[p].c_str(), rows,
             v[rounds / 2] * 1e3, ratio[rounds / 2], flops / v[rounds / 2] / 1e9,
             groups * group_len * sizeof(W) / v[rounds / 2] / 1e9);
    }
  }
}

int main(int argc, char** argv) {
  const int rounds = argc > 1 ? atoi(argv[1]) : 10;
  BF16 = argc <= 2 || std::string(argv[2]) == "bf16";
  if (argc > 3) K = atoll(argv[3]);
  if (BF16) bench<uint16_t>(rounds); else bench<float>(rounds);
}
