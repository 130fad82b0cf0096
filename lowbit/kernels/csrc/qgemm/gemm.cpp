// Larger M: the blocked register-tiled GEMM over dequantized row blocks, and the tiled sgemm.
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>

#include <cstdlib>
#include <memory>
#include <vector>

#include "layer.h"

namespace lowbit::LOWBIT_ISA {
namespace {

// M > 1: dequantize a block of rows into an L2-resident fp32 buffer once, then run a 4x3
// register-tiled dot-product microkernel over it (12 accumulators, 7 loads per 12 FMAs), which
// keeps both FMA ports busy like an sgemm while reading W's packed bytes only once per
// 64 activation rows.
template <int MR, int NR>
inline void micro(const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k8,
                  float* y, int64_t ldy, const float* bias) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k8; k += 8) {
    __m256 wv[NR];
    for (int j = 0; j < NR; ++j) wv[j] = _mm256_loadu_ps(w + j * ldw + k);
    for (int i = 0; i < MR; ++i) {
      const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_fmadd_ps(xv, wv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + j] = hsum(acc[i][j]) + (bias ? bias[j] : 0.0f);
}

template <int NR>
inline void micro_m(int64_t mr, const float* x, int64_t ldx, const float* w, int64_t ldw, int64_t k8,
                    float* y, int64_t ldy, const float* bias) {
  switch (mr) {
    case 4: micro<4, NR>(x, ldx, w, ldw, k8, y, ldy, bias); break;
    case 3: micro<3, NR>(x, ldx, w, ldw, k8, y, ldy, bias); break;
    case 2: micro<2, NR>(x, ldx, w, ldw, k8, y, ldy, bias); break;
    default: micro<1, NR>(x, ldx, w, ldw, k8, y, ldy, bias); break;
  }
}

}  // namespace

template <int BITS>
void gemm_blocked(const Layer& L, const float* x, int64_t M, int64_t ldx, float* y) {
  constexpr int64_t MR = 4, NR = 3, MC = 64;
  const int64_t k8 = 8 * L.np;
  // Rows per block: ~96 KiB of fp32 (fits L2 with the activation panel), a multiple of NR,
  // and small enough that every thread gets a few blocks.
  int64_t nb = std::max<int64_t>(NR, (96 * 1024 / 4) / k8 / NR * NR);
  const int64_t per_thread = (L.n + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads());
  nb = std::max<int64_t>(NR, std::min(nb, (per_thread + NR - 1) / NR * NR));
  const int64_t blocks = (L.n + nb - 1) / nb;
  for (int64_t m0 = 0; m0 < M; m0 += MC) {
    const int64_t mc = std::min(MC, M - m0);
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      std::unique_ptr<float[]> buf(new float[nb * k8]);  // uninitialized: fully overwritten
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t n0 = b * nb, nr_block = std::min(nb, L.n - n0);
        dequant_rows<BITS>(L, n0, n0 + nr_block, buf.get(), k8);
        for (int64_t i = 0; i < mc; i += MR) {
          const int64_t mr = std::min(MR, mc - i);
          const float* xi = x + (m0 + i) * ldx;
          float* yi = y + (m0 + i) * L.n + n0;
          for (int64_t j = 0; j < nr_block; j += NR) {
            const float* bias = L.bias ? L.bias + n0 + j : nullptr;
            const float* wj = buf.get() + j * k8;
            switch (std::min(NR, nr_block - j)) {
              case 3: micro_m<3>(mr, xi, ldx, wj, k8, k8, yi + j, L.n, bias); break;
              case 2: micro_m<2>(mr, xi, ldx, wj, k8, k8, yi + j, L.n, bias); break;
              default: micro_m<1>(mr, xi, ldx, wj, k8, k8, yi + j, L.n, bias); break;
            }
          }
        }
      }
    });
  }
}

namespace {

// Large M (prefill chunks, wide decode batches) is compute-bound, so the multiply goes to the
// BLAS sgemm, which runs at the machine's widest SIMD; dequantization costs N*K once against
// M*N*K multiply-adds. Two ways to feed it, measured (bench_kernels.py --modes):
//  * M < kWholeM: each thread takes whole tiles of rows, dequantizes one (sized to stay in its
//    L2) into its own scratch and multiplies it at once with a single-threaded sgemm (nested in
//    the parallel region), so the fp32 weights never go to memory and back;
//  * M >= kWholeM: the sgemm itself dominates and runs best as one large multi-threaded call, so
//    W is dequantized in 8 MiB tiles (every decoder linear of a small model in one).
constexpr int64_t kWholeM = 256;

int64_t tile_bytes() {
  static const int64_t b = [] {
    const char* e = std::getenv("LOWBIT_TILE_KB");  // for re-measuring on other caches
    return (e ? std::atoll(e) : 1024) * 1024;
  }();
  return b;
}

}  // namespace

template <int BITS>
void gemm_tiled(const Layer& L, const at::Tensor& x, at::Tensor& y) {
  const int64_t k8 = 8 * L.np;
  // y[:, n0 : n0 + nr] = x @ tile^T, tile = fp32 rows n0.. of W at t
  auto multiply = [&](const float* t, int64_t n0, int64_t nr) {
    auto yt = y.narrow(1, n0, nr);
    at::mm_out(yt, x, at::from_blob(const_cast<float*>(t), {nr, k8}, x.options()).t());
  };
  if (x.size(0) >= kWholeM) {
    const int64_t rows = std::clamp<int64_t>((8 << 20) / 4 / k8, 64, L.n);
    shared_tiles(L.n, rows, k8, thread_scratch<float>(rows * k8),
                 [&](int64_t r0, int64_t r1, float* out) { dequant_rows<BITS>(L, r0, r1, out, k8); }, multiply);
  } else {
    // tiles sized to the L2 budget, equal over the threads (equal_tile_rows), 16-row aligned
    const int64_t max_rows = std::clamp<int64_t>(tile_bytes() / 4 / k8 / 16 * 16, 16, L.n);
    parallel_tiles(L.n, equal_tile_rows(L.n, max_rows, 16), [&](int64_t n0, int64_t nr) {
      float* t = thread_scratch<float>(nr * k8);
      dequant_rows<BITS>(L, n0, n0 + nr, t, k8);
      multiply(t, n0, nr);
    });
  }
  if (L.bias) y.add_(at::from_blob((void*)L.bias, {L.n}, x.options()));
}

template void gemm_blocked<4>(const Layer&, const float*, int64_t, int64_t, float*);
template void gemm_blocked<8>(const Layer&, const float*, int64_t, int64_t, float*);
template void gemm_tiled<4>(const Layer&, const at::Tensor&, at::Tensor&);
template void gemm_tiled<8>(const Layer&, const at::Tensor&, at::Tensor&);

}  // namespace lowbit::LOWBIT_ISA
