// Standalone: how fast bf16 product tiles (AVX512-BF16 dot) stream 256 MB of weights on 2 threads,
// by rows, panels a tile and layout: a group of 4 panels interleaved step by step (the kernels'
// layout before 2026-11-27) or in pairs (after). Each round times every variant once, so a ratio to
// 1 row comes from one machine state; the medians of those ratios are what to read.
//
//   g++ -O3 -fopenmp -mavx512f -mavx512bw -mavx512vl -mavx512bf16 benchmarks/tile_layouts.cpp -o /tmp/tile_layouts
//   /tmp/tile_layouts 40 8192        (rounds, prefetch distance in bytes)
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>
#include <algorithm>
#include <omp.h>
static int PF = 8192;  // prefetch distance, bytes
// R rows over S panels whose step stride is `stride` uint32 words (interleaved layout: stride = 4*16)
template <int R, int S>
__attribute__((noinline)) void tile(const uint32_t* x, int64_t ldx, int64_t steps, const uint32_t* w, int64_t stride, float* y) {
  __m512 acc[R][S] = {};
  for (int64_t k = 0; k < steps; ++k) {
    const char* next = reinterpret_cast<const char*>(w + k * stride) + PF;
    if (PF) for (int64_t b = 0; b < S * 64; b += 64) _mm_prefetch(next + b, _MM_HINT_T1);
    __m512i ws[S];
#pragma GCC unroll 4
    for (int s = 0; s < S; ++s) ws[s] = _mm512_loadu_si512(w + k * stride + s * 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512i xb = _mm512_set1_epi32(x[r * ldx + k]);
#pragma GCC unroll 4
      for (int s = 0; s < S; ++s) acc[r][s] = _mm512_dpbf16_ps(acc[r][s], (__m512bh)ws[s], (__m512bh)xb);
    }
  }
  for (int r = 0; r < R; ++r) for (int s = 0; s < S; ++s) _mm512_storeu_ps(y + (r * S + s) * 16, acc[r][s]);
}
// R rows over 4 panels laid out as two pairs (w0, w1: [steps][2][16] each), two sequential runs
template <int R>
__attribute__((noinline)) void tile_pairs(const uint32_t* x, int64_t ldx, int64_t steps, const uint32_t* w0, const uint32_t* w1, float* y) {
  __m512 acc[R][4] = {};
  for (int64_t k = 0; k < steps; ++k) {
    if (PF) {
      const char* n0 = reinterpret_cast<const char*>(w0 + k * 32) + PF / 2;
      const char* n1 = reinterpret_cast<const char*>(w1 + k * 32) + PF / 2;
      _mm_prefetch(n0, _MM_HINT_T1); _mm_prefetch(n0 + 64, _MM_HINT_T1);
      _mm_prefetch(n1, _MM_HINT_T1); _mm_prefetch(n1 + 64, _MM_HINT_T1);
    }
    __m512i ws[4];
    ws[0] = _mm512_loadu_si512(w0 + k * 32); ws[1] = _mm512_loadu_si512(w0 + k * 32 + 16);
    ws[2] = _mm512_loadu_si512(w1 + k * 32); ws[3] = _mm512_loadu_si512(w1 + k * 32 + 16);
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      __m512i xb = _mm512_set1_epi32(x[r * ldx + k]);
#pragma GCC unroll 4
      for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_dpbf16_ps(acc[r][s], (__m512bh)ws[s], (__m512bh)xb);
    }
  }
  for (int r = 0; r < R; ++r) for (int s = 0; s < 4; ++s) _mm512_storeu_ps(y + (r * 4 + s) * 16, acc[r][s]);
}
const int64_t K2 = 288, GROUP_WORDS = K2 * 4 * 16;
static std::vector<uint32_t> w, x;
static float ys[2][4096];
template <int R, int S>
double pass_interleaved(int64_t groups) {  // library layout: [K2][4][16]; R rows in 4/S passes of S panels
  auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for num_threads(2) schedule(dynamic, 4)
  for (int64_t g = 0; g < groups; ++g)
    for (int s = 0; s < 4; s += S) tile<R, S>(x.data(), K2, K2, w.data() + g * GROUP_WORDS + s * 16, 64, ys[omp_get_thread_num()]);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
template <int R, int S>
double pass_paired2(int64_t groups) {  // halves laid out one after the other: [2][K2][2][16]
  auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for num_threads(2) schedule(dynamic, 4)
  for (int64_t g = 0; g < groups; ++g)
    for (int h = 0; h < 2; ++h) tile<R, S>(x.data(), K2, K2, w.data() + g * GROUP_WORDS + h * K2 * 32, 32, ys[omp_get_thread_num()]);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
template <int R>
double pass_paired4(int64_t groups) {
  auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel for num_threads(2) schedule(dynamic, 4)
  for (int64_t g = 0; g < groups; ++g)
    tile_pairs<R>(x.data(), K2, K2, w.data() + g * GROUP_WORDS, w.data() + g * GROUP_WORDS + K2 * 32, ys[omp_get_thread_num()]);
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
int main(int argc, char** argv) {
  int rounds = argc > 1 ? atoi(argv[1]) : 20;
  if (argc > 2) PF = atoi(argv[2]);
  const int64_t groups = (256LL << 20) / (GROUP_WORDS * 4);
  w.assign(groups * GROUP_WORDS, 0x3f803f80); x.assign(16 * K2, 0x3f803f80);
  const char* names[] = {"R1 S4 interleaved", "R4 S4 interleaved", "R8 S2 interleaved", "R8 S2 paired", "R6 S4 interleaved", "R1 S4 paired", "R4 S4 paired", "R6 S4 paired"};
  const int NV = 8; std::vector<std::vector<double>> t(NV);
  for (int r = 0; r < rounds; ++r) {
    t[0].push_back(pass_interleaved<1, 4>(groups));
    t[1].push_back(pass_interleaved<4, 4>(groups));
    t[2].push_back(pass_interleaved<8, 2>(groups));
    t[3].push_back(pass_paired2<8, 2>(groups));
    t[4].push_back(pass_interleaved<6, 4>(groups));
    t[5].push_back(pass_paired4<1>(groups));
    t[6].push_back(pass_paired4<4>(groups));
    t[7].push_back(pass_paired4<6>(groups));
  }
  double bytes = groups * GROUP_WORDS * 4.0;
  for (int i = 0; i < NV; ++i) {
    std::vector<double> ratio;
    for (int r = 0; r < rounds; ++r) ratio.push_back(t[i][r] / t[0][r]);
    std::sort(ratio.begin(), ratio.end());
    auto v = t[i]; std::sort(v.begin(), v.end());
    printf("%-20s best %.2f ms (%.1f GB/s) median %.2f ms; vs R1 same round: median %.3f, q25 %.3f\n", names[i], v[0] * 1e3,
           bytes / v[0] / 1e9, v[rounds / 2] * 1e3, ratio[rounds / 2], ratio[rounds / 4]);
  }
}
