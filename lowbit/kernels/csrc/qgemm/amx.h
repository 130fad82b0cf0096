// AMX-BF16 tile GEMM (qgemm/amx_bf16.cpp): y = x W^T with x rounded to bf16, W's rows given in bf16,
// fp32 accumulation in the tile unit.
//
// Why our own and not oneDNN's: oneDNN's bf16 matmul (torch's at::mm) reorders W into its own
// blocked layout on every call, and the quantized paths first dequantize W into a bf16 tile for it,
// so every weight byte is written and read twice more per step before a single multiply. Here the
// transposed product is taken, y^T = W x^T: W's rows are the A operand, whose tiles are plain
// row-major (16 rows x 32 bf16), so the dequantized (or stored bf16) rows are loaded as they are, and
// only x, which is small at decode, is rearranged into the B operand's pair-interleaved layout.
#pragma once

#include <cstdint>
#include <functional>

namespace lowbit::LOWBIT_ISA {

// W's rows in bf16: either stored (direct: row n at direct + n * ld) or produced on demand
// (fill(n0, n1, dst): rows [n0, n1) at dst + (n - n0) * ld). ld is a multiple of 32 and at least K
// rounded up to 32; columns K .. that meet zeros in x, so they need only be finite.
struct BfRows {
  const uint16_t* direct = nullptr;
  int64_t ld = 0;
  std::function<void(int64_t, int64_t, uint16_t*)> fill;
};

// Whether the AMX path runs: the CPU has AMX-BF16, the kernel granted this process the tile state,
// this is the AVX-512 build, and set_amx_enabled has not turned it off.
bool amx_bf16_active();
// Turns the AMX path on or off for the process (tests and benchmarks compare it with oneDNN's);
// returns the previous setting. Turning it on where the CPU lacks AMX leaves it inactive.
bool set_amx_enabled(bool on);
// Rows of x per call for which the AMX path is used: below kAmxMinM the bf16 gemv is faster; above
// kAmxMaxM oneDNN's matmul is (its blocking keeps both operands in L1; ours re-streams W's block and
// x's tiles per 32 rows of x). Measured per call of the default model's 120 W4 linears, 1 thread,
// oneDNN vs AMX: M = 16 37.2 vs 18.2 ms, 64 60.7 vs 27.0, 96 58.5 vs 52.3, 128 78.7 vs 79.9, 255
// 111.4 vs 125.8 (a busy box: ratios only).
constexpr int64_t kAmxMinM = 16;
constexpr int64_t kAmxMaxM = 96;

// Whether a call of M rows takes the AMX path.
inline bool amx_rows(int64_t M) { return M >= kAmxMinM && M <= kAmxMaxM; }

// y[m, n] (row stride ldy) = sum_k bf16(x[m, k]) * W[n, k] for m < M, n < N, k < K (x's row stride
// ldx). Requires amx_bf16_active().
void amx_bf16_gemm(const float* x, int64_t M, int64_t ldx, int64_t K, const BfRows& w, int64_t N, float* y,
                   int64_t ldy);

}  // namespace lowbit::LOWBIT_ISA
