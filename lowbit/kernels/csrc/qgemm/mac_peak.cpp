// The machine's int8 multiply-accumulate peak with the instructions the int8 GEMMs use
// (lowbit/bench/ceilings.py judges them against it): a register-only loop of independent
// accumulator chains, one per torch thread, no memory traffic.
//   AVX2: vpmaddubsw (+ vpaddw), 32 u8 x s8 products each (the W8A8/W4A8 products; the kernels add
//   a vpmaddwd widening per one or two of them, so they reach 1/2 to 2/3 of this);
//   AVX-512 VNNI: vpdpbusd, 64 products per chain step.
// Enough chains to cover the latencies on two vector ports. Returns the products done.
#include <ATen/Parallel.h>

#include <atomic>

#include "../api.h"
#include "int8.h"

namespace lowbit::LOWBIT_ISA {

int64_t int8_mac_peak(int64_t iters) {
  TORCH_CHECK(iters > 0, "int8_mac_peak: iters must be positive");
  const int64_t threads = at::get_num_threads();
  std::atomic<int64_t> sink{0};
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      int32_t lanes[16];
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
      constexpr int kChains = 10;
      __m512i acc[kChains];
      const __m512i a = _mm512_set1_epi8(static_cast<char>(3 + t)), b = _mm512_set1_epi8(5);
      for (int j = 0; j < kChains; ++j) acc[j] = _mm512_set1_epi32(j);
      for (int64_t i = 0; i < iters; ++i)
        for (int j = 0; j < kChains; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], a, b);
      for (int j = 1; j < kChains; ++j) acc[0] = _mm512_add_epi32(acc[0], acc[j]);
      _mm512_storeu_si512(lanes, acc[0]);
#else
      // vpmaddubsw's throughput: each does 32 u8 x s8 products, accumulated here in int16 (vpaddw)
      // as the W4A8 kernel does between widenings (the peak loop's values wrap harmlessly). The
      // products do not depend on the accumulators, so the compiler would compute them once per
      // step for every chain: the step is written in asm (6 chains: 12 registers + 2 inputs).
      __m256i c0 = _mm256_setzero_si256(), c1 = c0, c2 = c0, c3 = c0, c4 = c0, c5 = c0;
      const __m256i a = _mm256_set1_epi8(static_cast<char>(1 + t)), b = _mm256_set1_epi8(5);
      for (int64_t i = 0; i < iters; ++i) {
        asm volatile(
            "vpmaddubsw %[b], %[a], %%ymm10\n\t"
            "vpmaddubsw %[b], %[a], %%ymm11\n\t"
            "vpmaddubsw %[b], %[a], %%ymm12\n\t"
            "vpmaddubsw %[b], %[a], %%ymm13\n\t"
            "vpmaddubsw %[b], %[a], %%ymm14\n\t"
            "vpmaddubsw %[b], %[a], %%ymm15\n\t"
            "vpaddw %%ymm10, %[c0], %[c0]\n\t"
            "vpaddw %%ymm11, %[c1], %[c1]\n\t"
            "vpaddw %%ymm12, %[c2], %[c2]\n\t"
            "vpaddw %%ymm13, %[c3], %[c3]\n\t"
            "vpaddw %%ymm14, %[c4], %[c4]\n\t"
            "vpaddw %%ymm15, %[c5], %[c5]\n\t"
            : [c0] "+x"(c0), [c1] "+x"(c1), [c2] "+x"(c2), [c3] "+x"(c3), [c4] "+x"(c4), [c5] "+x"(c5)
            : [a] "x"(a), [b] "x"(b)
            : "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
      }
      c0 = _mm256_add_epi16(_mm256_add_epi16(_mm256_add_epi16(c0, c1), _mm256_add_epi16(c2, c3)),
                            _mm256_add_epi16(c4, c5));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(lanes), c0);
#endif
      sink += lanes[0];  // keeps the loop alive
    }
  });
  (void)sink.load();
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  constexpr int64_t kPerStep = 10 * 64;  // chains x products per vpdpbusd
#else
  constexpr int64_t kPerStep = 6 * 32;  // chains x products per vpmaddubsw
#endif
  return threads * iters * kPerStep;
}

}  // namespace lowbit::LOWBIT_ISA
