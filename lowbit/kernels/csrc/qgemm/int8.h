// Int8-activation GEMMs (W8A8, W4A8): the packed weight layouts, the per-token activation
// quantizer and the row/panel driver shared by gemm_w8a8.cpp and gemm_w4a8.cpp.
//
// Why int8 activations: with x rounded to int8 per token, a multiply-add is one byte of each side,
// so one AVX2 vpmaddubsw does 32 of them (AVX-512 VNNI vpdpbusd: 64 into int32 in one uop), versus 8
// per fp32 FMA. Decode stays bound by the weight bytes; prefill and wide batches become 2-4x cheaper.
//
// Activations (quantize_rows): per token (row) symmetric, scale = max|x| / 127, q = round-to-even(x *
// (127 / max|x|)) in [-127, 127] (never -128, so |q| fits a u8 below 128); an all-zero row has scale 0
// and q = 0. K is zero-padded to the weight's Kp, so padding adds nothing.
//
// Weights, packed once at load time by lowbit/layers/linear_int8.py (one layout for every ISA):
//   W8 (int8 symmetric per output channel): int8 [P, Kp/4, 16, 4], P = ceil(N/16) panels of 16
//      output channels, Kp = K rounded up to 8; packed[p, t, j, i] = w[16p + j, 4t + i] (zeros pad).
//      One 64-byte (panel, quad) block is one zmm for vpdpbusd (16 int32 lanes, 4 k each) or two ymm.
//      rowsum[n] = sum_k w[n, k] (int32 [16P]) for the VNNI +128 correction.
//   W4 (unsigned 4-bit codes q with per-group scale s and zero z, W = (q - z) s): uint8 [P, Kp/8, 64];
//      byte 4j + i of block (p, t) holds q[16p + j, 8t + i] in its low nibble and q[16p + j, 8t + 4 + i]
//      in its high nibble, so one mask gives quad 2t and one shift + mask quad 2t + 1, both already
//      in the W8 lane order. Group params as float [P, ng, 16]: s and z * s.
//
// Integer products:
//   AVX2 W8A8: vpmaddubsw multiplies u8 x s8 and adds pairs into int16 with saturation; x + 128 (u8
//     up to 255) times w (up to 127) could reach 64770 and saturate, so the sign trick: |x| as u8 times
//     sign(x) * w as s8 (vpsignb), at most 127 * 127 * 2 = 32258, exact; vpmaddwd by 1 widens to int32.
//   AVX-512 VNNI W8A8: vpdpbusd on (x + 128) as u8 and w as s8 (no saturation), minus 128 * rowsum[n].
//   W4A8 (both): x is quantized per token and per weight group (gemm_w4a8.cpp says why). The weight
//     codes (0..15) are the unsigned side as they are, x the signed side:
//     15 * 127 * 2 = 3810 per vpmaddubsw pair, so two quads add in int16 before widening; the zero
//     point is a per-group correction z * s * sum(x over the group), the sums computed per row.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/vec.h"
#include "layer.h"  // with_rows

namespace lowbit::LOWBIT_ISA {

// four activation bytes as one 32-bit lane value (unaligned, no aliasing UB), to broadcast
inline int32_t load_i32(const void* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

constexpr int64_t kPanel = 16;  // output channels per packed panel
// Activation rows per register tile. vpdpbusd has a latency of ~5 cycles at up to 2 per cycle, so
// a tile needs ~10 independent accumulator chains to keep the units busy: 8 rows (16 chains in
// W4A8, lo and hi nibbles apart) in the 32 zmm registers of AVX-512; AVX2's 16 ymm fit 4 rows x 2.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int64_t kMR = 8;
#else
constexpr int64_t kMR = 4;
#endif
constexpr int64_t kMC = 64;     // activation rows kept in L2 while a thread sweeps its panels

// Row x[0..K) -> q[0..Kp) (zero padded), returns the row's scale (max|x| / 127, 0 for a zero row).
float quantize_row(const float* x, int64_t K, int64_t Kp, int8_t* q);

// Quantized activations of M rows: q [M, Kp] and scales [M], rows over the threads.
void quantize_rows(const float* x, int64_t M, int64_t K, int64_t ldx, int64_t Kp, int8_t* q, float* scales);

// x [..., K] (K <= Kp) as fp32 rows [M, K] with unit stride along K (a view where it already is).
inline at::Tensor input_rows(const at::Tensor& x_in, int64_t Kp, const char* op) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) <= Kp, op, ": input has ", x_in.size(-1),
              " features, more than the weight's ", Kp);
  at::Tensor x = x_in.reshape({-1, x_in.size(-1)});
  if (x.scalar_type() != at::kFloat) x = x.to(at::kFloat);
  if (x.stride(-1) != 1) x = x.contiguous();
  return x;
}

// y [M, N] back to x_in's leading shape [..., N] and dtype.
inline at::Tensor like_input(const at::Tensor& y, const at::Tensor& x_in) {
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = y.size(1);
  at::Tensor out = y.view(shape);
  return x_in.scalar_type() == at::kFloat ? out : out.to(x_in.scalar_type());
}

// Runs tile(p, m0, rows) over every (panel, row block): panels split over the threads, each thread
// sweeping its panels once per kMC rows, so the rows stay in L2 and a panel (16 * Kp bytes or half
// that) in L1 while its row blocks pass.
template <typename Tile>
void over_panels(int64_t M, int64_t panels, int64_t Kp, Tile&& tile) {
  // ~32k weights per task (as the weight-only kernels): below that a second thread costs more.
  const int64_t grain = std::max<int64_t>(1, 32768 / (kPanel * Kp));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    for (int64_t m0 = 0; m0 < M; m0 += kMC) {
      const int64_t m1 = std::min(M, m0 + kMC);
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t r = m0; r < m1; r += kMR) tile(p, r, std::min(kMR, m1 - r));
    }
  });
}

// The bias of panel n0 as 16 floats: in place for a whole panel, else (no bias, or the last,
// partial panel) copied into tmp with zeros after the last channel.
inline const float* panel_bias(const float* bias, int64_t n0, int64_t N, float* tmp) {
  if (bias != nullptr && n0 + kPanel <= N) return bias + n0;
  for (int64_t i = 0; i < kPanel; ++i) tmp[i] = (bias != nullptr && n0 + i < N) ? bias[n0 + i] : 0.0f;
  return tmp;
}

// Stores 16 outputs of one row, only the n_valid first (the last panel may be partial).
inline void store_panel(float* y, const float* v, int64_t n_valid) {
  if (n_valid >= kPanel) {
    std::copy(v, v + kPanel, y);
  } else {
    std::copy(v, v + n_valid, y);
  }
}

}  // namespace lowbit::LOWBIT_ISA
