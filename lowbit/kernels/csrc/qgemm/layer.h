// Weight-only quantized linear kernels for CPU decode (fp32 activations): the layer description
// and the pieces shared by the gemv/gemm translation units of this directory.
//
// Why a custom kernel: PyTorch's int4/int8 weight-pack matmuls only vectorize bf16/fp16
// activations on x86; with fp32 activations they run a scalar loop that is 10-100x slower
// than fp32 BLAS. At decode (M = 1) the job is to stream the packed weight at memory speed,
// so the inner loop has to turn packed integers into fp32 with as few uops as possible.
//
// Packed layouts (built by lowbit/layers/linear.py, one row of W per row of the tensor):
//   4-bit: K is padded to a multiple of 64. Each 64-weight chunk is 32 bytes = 8 uint32
//          words; nibble i (bits 4i..4i+3) of word j holds weight k = 64*c + 8*i + j.
//          One 256-bit load + a shift and a mask yields 8 consecutive weights in lane order,
//          without any cross-lane shuffle.
//   8-bit: plain row-major int8 [N, K8] holding q - 2^(bits-1) (K8 = K rounded up to 8), so a
//          tied embedding and PyTorch's int8 weight-only matmul can share it.
// Scales: float32 [N, ngroups]; offset: float32 offset per group (or one broadcast value when
// every zero is equal, e.g. symmetric quantization), so W = (stored + offset) * scale, i.e.
// offset = -zero for 4-bit and 2^(bits-1) - zero for the 8-bit container.
//
// Small M (gemv, decode) uses a factored dot product: y = sum_g s_g * (dot(q_g, x_g) + off_g *
// sum(x_g)), so no weight is ever scaled individually. By default (Gemv16, M <= kGemvMaxM) x is
// rounded to int16 per 64-weight chunk and dot(q_g, x_g) is an integer sum, 16 multiply-adds per
// vpmaddwd (1.4-1.5x faster than fp32 x), each chunk of W unpacked once for up to 4 rows of x;
// Gemv keeps x in fp32 (and + cvt + fma per 8 weights) for groups of 32 (M = 1 only) and
// non-finite x.
// M > 1 (gemm_blocked) dequantizes a block of rows once into an L2-resident fp32 buffer and
// runs a register-tiled microkernel over it. Large M (gemm_tiled) dequantizes W into a reused
// fp32 scratch and hands it to the BLAS sgemm (compute-bound there; see linear.py TILE_MIN_M).
//
// Files: dequant.cpp (packed rows -> fp32), gemv_f32.cpp (small M, fp32 x), gemv_i16.cpp (small M,
// x rounded to int16), gemm.cpp (larger M: blocked microkernel, tiled sgemm), linear.cpp (entry
// points: argument checks, kernel choice by M).
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common/vec.h"

namespace lowbit::LOWBIT_ISA {

struct Layer {
  const uint8_t* w;      // packed weights
  int64_t row_bytes;     // bytes per packed row
  const float* s;        // [N, ng]
  const float* off;      // offset per group: W = (stored + off) * s
  int64_t off_row;       // row stride of off (0 when constant)
  int64_t off_grp;       // group stride of off (0 when constant)
  const float* bias;     // [N] or nullptr
  int64_t ng;            // groups per row
  int64_t gp;            // pieces (of 8 weights) per group
  int64_t np;            // pieces per row (= K8 / 8)
  int64_t n;             // output features
};


// Both gemv kernels prefetch the row block this many blocks ahead (rows are contiguous, so that
// is one sequential stream): one block is ~0.1 us of work, shorter than a DRAM round trip.
constexpr int kPrefetchBlocks = 4;

// The scales/offsets of the R-row block kPrefetchBlocks ahead of row n0.
inline void prefetch_group_params(const Layer& L, int64_t n0, int R) {
  const int64_t ahead = n0 + kPrefetchBlocks * R;
  for (int64_t o = 0; o < R * L.ng; o += 16) {
    _mm_prefetch(reinterpret_cast<const char*>(L.s + ahead * L.ng + o), _MM_HINT_T0);
    if (L.off_row) _mm_prefetch(reinterpret_cast<const char*>(L.off + ahead * L.off_row + o), _MM_HINT_T0);
  }
}

// The packed bytes of that block, given the block's first row (the loops add the chunk offset).
inline const char* prefetch_rows_base(const Layer& L, const uint8_t* row0, int R) {
  return reinterpret_cast<const char*>(row0 + kPrefetchBlocks * R * L.row_bytes);
}

// f(std::integral_constant<int, rows>) for 1 <= rows <= R: row counts as template arguments.
template <int R, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (R > 1) {
    if (rows < R) return with_rows<R - 1>(rows, f);
  }
  f(std::integral_constant<int, R>{});
}

// Rows in blocks of R over the threads; kernel(n0, rows) computes rows n0 .. n0 + rows - 1.
template <int R, typename F>
void over_row_blocks(const Layer& L, F&& kernel) {
  const int64_t blocks = (L.n + R - 1) / R;
  // ~32k weights per task: below that, waking a second thread costs more than it saves.
  const int64_t grain = std::max<int64_t>(1, 32768 / (R * 8 * L.np));
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) kernel(b * R, std::min<int64_t>(R, L.n - b * R));
  });
}

// Per-thread scratch of n elements of T, reused across calls (a fresh multi-MB allocation per call
// would be page-faulted in on every linear of every step). Each Tag is its own buffer, so a kernel can
// hold several at once (the bf16 path: an fp32 row block while it fills a bf16 tile).
template <typename T, int Tag = 0>
T* thread_scratch(int64_t n) {
  thread_local std::vector<T> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Rows per tile for the per-thread tile loops (gemm_tiled, gemm_tiled_bf16): as many tiles as a budget
// of max_rows asks for, rounded up to a multiple of the thread count, then cut equal and `align`-row
// aligned: at decode widths every thread must get the same rows (2 threads over 960 rows in 448-row
// tiles gave one thread 896 rows and the other 64).
inline int64_t equal_tile_rows(int64_t n, int64_t max_rows, int64_t align) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t needed = (n + max_rows - 1) / max_rows;
  const int64_t want = (needed + threads - 1) / threads * threads;
  return std::min<int64_t>(n, ((n + want - 1) / want + align - 1) / align * align);
}

// f(n0, rows) for consecutive tiles of `rows` rows over [0, n), spread over the threads; the caller's
// InferenceMode is carried into the workers (they do not inherit it).
template <typename F>
void parallel_tiles(int64_t n, int64_t rows, F&& f) {
  const int64_t tiles = (n + rows - 1) / rows;
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    c10::InferenceMode guard(inference);
    for (int64_t ti = t0; ti < t1; ++ti) f(ti * rows, std::min(rows, n - ti * rows));
  });
}

// Large M: W dequantized `rows` rows at a time into one shared scratch t (every thread dequantizes part
// of each tile: dequant(r0, r1, out)), then multiply(t, n0, nr) runs once per tile (a multi-threaded
// BLAS call); gemm_tiled and gemm_tiled_bf16 differ only in the element type and the multiply.
template <typename T, typename Dequant, typename Multiply>
void shared_tiles(int64_t n, int64_t rows, int64_t k8, T* t, Dequant&& dequant, Multiply&& multiply) {
  for (int64_t n0 = 0; n0 < n; n0 += rows) {
    const int64_t nr = std::min(rows, n - n0);
    at::parallel_for(0, nr, 16, [&](int64_t r0, int64_t r1) { dequant(n0 + r0, n0 + r1, t + r0 * k8); });
    multiply(t, n0, nr);
  }
}

// Whether gemv16 applies: its x steps are per 64-weight chunk, so groups must be whole chunks.
inline bool gemv16_fits(const Layer& L) { return L.ng == 1 || L.gp % 8 == 0; }

// Up to this many rows, gemv16 (W streamed once per 4 activation rows) beats dequantizing into
// fp32 (gemm_blocked): every linear of the default model in turn, cold, 2 threads: M = 2 5.4 vs
// 12.7 ms, M = 4 8.3 vs 13.7, M = 8 16.6 vs 21.0, M = 12 28.9 vs 28.5, M = 16 32.8 vs 31.0.
constexpr int64_t kGemvMaxM = 12;

// The kernels, each instantiated for BITS = 4 and 8 in its own file.
// gemv_f32.cpp: y = W x for one activation row, x kept in fp32.
template <int BITS>
void gemv(const Layer& L, const float* x, float* y);
// gemv_i16.cpp: y[m] = W x[m] for M rows (row strides ldx / ldy), x rounded to int16 per chunk.
template <int BITS>
void gemv16_batch(const Layer& L, const float* x, int64_t M, int64_t ldx, float* y, int64_t ldy);
// dequant.cpp: fp32 rows [n0, n1) of W into out[(n - n0) * ldo + k].
template <int BITS>
void dequant_rows(const Layer& L, int64_t n0, int64_t n1, float* out, int64_t ldo);
// gemm.cpp: y [M, N] = x [M, K8] W^T (+ bias), register-tiled over dequantized row blocks.
template <int BITS>
void gemm_blocked(const Layer& L, const float* x, int64_t M, int64_t ldx, float* y);
// gemm.cpp: y = x W^T (+ bias) through the BLAS sgemm on dequantized tiles (large M).
template <int BITS>
void gemm_tiled(const Layer& L, const at::Tensor& x, at::Tensor& y);
// bf16.cpp: the same product in bf16 (fp32 accumulation): W dequantized tile by tile into bf16,
// x rounded to bf16, torch's bf16 matmul (oneDNN; AMX or AVX512_BF16 where the CPU has them).
template <int BITS>
void gemm_tiled_bf16(const Layer& L, const at::Tensor& x, at::Tensor& y);

// linear.cpp: the Layer view of a packed weight (checks shapes and dtypes).
Layer make_layer(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& offset,
                 const c10::optional<at::Tensor>& bias, int64_t bits, int64_t k8, int64_t group);

}  // namespace lowbit::LOWBIT_ISA
