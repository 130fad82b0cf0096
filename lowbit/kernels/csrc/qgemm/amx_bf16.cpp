// AMX-BF16 tile GEMM: see amx.h for why. Compiled into every variant; the tile code exists only in
// the AVX-512 build (the AVX2 build's amx_bf16_active() is always false).
//
// Tiles (all 16 rows x 64 bytes): A = 16 rows of W x 32 k (bf16, row-major, straight from W or from
// the per-thread dequantized block); B = 32 k x 16 rows of x in AMX's pair layout (tile row r holds,
// for each of 16 activation rows, the bf16 pair x[m, 2r], x[m, 2r + 1]); C = 16 W rows x 16 x rows,
// fp32. tdpbf16ps C += A B accumulates 16 x 16 x 32 products per instruction.
// Register plan: 2 A (32 W rows) x 2 B (32 x rows) -> 4 C, so each loaded tile feeds 2 products.
#include "amx.h"

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cstring>

#if defined(__AVX512BF16__)
#include <sys/syscall.h>
#include <unistd.h>

#include <cpuid.h>
#endif

#include "layer.h"

namespace lowbit::LOWBIT_ISA {
namespace {

std::atomic<bool> g_enabled{true};

#if defined(__AVX512BF16__)

constexpr int kTileK = 32;  // bf16 values per tile row
constexpr int kTile = 16;   // rows per tile
constexpr int kBlockN = 2 * kTile;
constexpr int kBlockM = 2 * kTile;

// CPUID.(7,0).EDX: AMX-BF16 bit 22, AMX-TILE bit 24; XCR0 bits 17-18 (tile config and data) enabled by
// the OS; Linux then grants the tile data state per process on request (arch_prctl
// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA = 18), without which the first tile instruction faults.
bool amx_supported() {
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 22) & 1) || !((d >> 24) & 1)) return false;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE: xgetbv allowed
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  if (((lo >> 17) & 3) != 3) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool amx_usable() {
  static const bool ok = amx_supported();
  return ok;
}

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// x [M, K] -> B tiles: xv[((mt * KT + kt) * 16 + r) * 16 + m % 16] (uint32 = one bf16 pair) for
// m-tile mt, k-tile kt; rows m >= M and columns k >= K are zeros. MT is rounded up to even.
void pack_x(const float* x, int64_t M, int64_t ldx, int64_t K, int64_t MT, int64_t KT, uint32_t* xv) {
  at::parallel_for(0, MT, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t mt = t0; mt < t1; ++mt) {
      uint32_t* tiles = xv + mt * KT * 256;
      std::memset(tiles, 0, KT * 256 * sizeof(uint32_t));
      for (int64_t i = 0; i < kTile && mt * kTile + i < M; ++i) {
        const float* row = x + (mt * kTile + i) * ldx;
        for (int64_t kt = 0; kt < KT; ++kt) {
          alignas(64) float f[kTileK] = {};
          const int64_t k0 = kt * kTileK, nk = std::min<int64_t>(kTileK, K - k0);
          std::memcpy(f, row + k0, nk * sizeof(float));
          alignas(64) uint16_t h[kTileK];
          to_bf16(f, h, kTileK);
          uint32_t pairs[kTile];
          std::memcpy(pairs, h, sizeof(pairs));
          for (int r = 0; r < kTile; ++r) tiles[(kt * kTile + r) * kTile + i] = pairs[r];
        }
      }
    }
  });
}

// C (16 W rows x 16 x rows, fp32, row-major) -> y[m0 + m, n0 + n] for m < mr, n < nr: a 16 x 16
// transpose in registers (unpack, 64-bit shuffle, two 128-bit lane shuffles), then one masked row store
// per x row (256 scalar stores with a stride of N floats cost as much as the tile products of K = 576).
inline void store_tile(const float* c, int64_t n0, int64_t nr, int64_t m0, int64_t mr, float* y, int64_t ldy) {
  if (mr <= 0 || nr <= 0) return;
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(c + 16 * i);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + j]: column j of each 128-bit lane, rows i .. i + 3
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int h = 0; h < 16; h += 8) {  // pair row quartets (h .. h + 3) and (h + 4 .. h + 7)
    for (int j = 0; j < 4; ++j) {
      t[h + j] = _mm512_shuffle_f32x4(r[h + j], r[h + 4 + j], 0x88);      // columns j, 8 + j
      t[h + 4 + j] = _mm512_shuffle_f32x4(r[h + j], r[h + 4 + j], 0xDD);  // columns 4 + j, 12 + j
    }
  }
  const __mmask16 keep = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
  for (int j = 0; j < 8; ++j) {  // t[j] and t[8 + j] hold columns j and 8 + j of rows 0-7 and 8-15
    if (j < mr) _mm512_mask_storeu_ps(y + (m0 + j) * ldy + n0, keep, _mm512_shuffle_f32x4(t[j], t[8 + j], 0x88));
    if (j + 8 < mr)
      _mm512_mask_storeu_ps(y + (m0 + j + 8) * ldy + n0, keep, _mm512_shuffle_f32x4(t[j], t[8 + j], 0xDD));
  }
}

// One 32-row block of W (a: row stride lda elements) against every 32-row block of x.
__attribute__((target("amx-tile,amx-bf16"))) void block_product(const uint16_t* a, int64_t lda, const uint32_t* xv,
                                                                int64_t MT, int64_t KT, int64_t n0, int64_t nr,
                                                                int64_t M, float* y, int64_t ldy) {
  alignas(64) float c[4][kTile * kTile];
  const int64_t a_stride = lda * 2;  // bytes
  for (int64_t mt = 0; mt < MT; mt += 2) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const uint32_t* b0 = xv + mt * KT * 256;
    const uint32_t* b1 = b0 + KT * 256;
    for (int64_t kt = 0; kt < KT; ++kt) {
      _tile_loadd(4, a + kt * kTileK, a_stride);
      _tile_loadd(5, a + kTile * lda + kt * kTileK, a_stride);
      _tile_loadd(6, b0 + kt * 256, 64);
      _tile_loadd(7, b1 + kt * 256, 64);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
    _tile_stored(0, c[0], 64);
    _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64);
    _tile_stored(3, c[3], 64);
    const int64_t m0 = mt * kTile, m1 = m0 + kTile;
    const int64_t mr0 = std::clamp<int64_t>(M - m0, 0, kTile), mr1 = std::clamp<int64_t>(M - m1, 0, kTile);
    const int64_t nr0 = std::min<int64_t>(nr, kTile), nr1 = std::max<int64_t>(0, nr - kTile);
    store_tile(c[0], n0, nr0, m0, mr0, y, ldy);
    store_tile(c[1], n0, nr0, m1, mr1, y, ldy);
    store_tile(c[2], n0 + kTile, nr1, m0, mr0, y, ldy);
    store_tile(c[3], n0 + kTile, nr1, m1, mr1, y, ldy);
  }
}

__attribute__((target("amx-tile"))) void configure_tiles() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.rows[t] = kTile;
    cfg.colsb[t] = 64;
  }
  // the intrinsic's memory operand does not tell the compiler that all 64 bytes are read: without
  // this barrier GCC drops the rows/colsb stores as dead and the tiles stay unconfigured (#UD)
  __asm__ __volatile__("" : : "r"(&cfg) : "memory");
  _tile_loadconfig(&cfg);
}

__attribute__((target("amx-tile"))) void release_tiles() { _tile_release(); }

#endif  // __AVX512BF16__

}  // namespace

bool amx_bf16_active() {
#if defined(__AVX512BF16__)
  return g_enabled.load(std::memory_order_relaxed) && amx_usable();
#else
  return false;
#endif
}

bool set_amx_enabled(bool on) { return g_enabled.exchange(on); }

void amx_bf16_gemm(const float* x, int64_t M, int64_t ldx, int64_t K, const BfRows& w, int64_t N, float* y,
                   int64_t ldy) {
#if defined(__AVX512BF16__)
  TORCH_CHECK(amx_bf16_active(), "amx_bf16_gemm: AMX-BF16 is not available");
  TORCH_CHECK(w.ld % kTileK == 0 && w.ld >= (K + kTileK - 1) / kTileK * kTileK, "amx_bf16_gemm: bad row stride");
  if (M <= 0 || N <= 0) return;
  const int64_t KT = (K + kTileK - 1) / kTileK;
  const int64_t MT = (M + kBlockM - 1) / kBlockM * 2;
  uint32_t* xv = thread_scratch<uint32_t, 4>(MT * KT * 256);
  pack_x(x, M, ldx, K, MT, KT, xv);
  const int64_t blocks = (N + kBlockN - 1) / kBlockN;
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    uint16_t* buf = thread_scratch<uint16_t, 3>(kBlockN * w.ld);
    configure_tiles();
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t n0 = b * kBlockN, nr = std::min<int64_t>(kBlockN, N - n0);
      const uint16_t* a;
      if (w.direct != nullptr && nr == kBlockN) {
        a = w.direct + n0 * w.ld;
      } else {
        if (w.direct != nullptr) {
          std::memcpy(buf, w.direct + n0 * w.ld, nr * w.ld * sizeof(uint16_t));
        } else {
          w.fill(n0, n0 + nr, buf);
        }
        if (nr < kBlockN) std::memset(buf + nr * w.ld, 0, (kBlockN - nr) * w.ld * sizeof(uint16_t));
        a = buf;
      }
      if (w.direct != nullptr && b + 1 < b1)  // the next block's rows, while this one multiplies
        prefetch_l2(w.direct + (n0 + kBlockN) * w.ld, std::min<int64_t>(kBlockN, N - n0 - kBlockN) * w.ld * 2);
      block_product(a, w.ld, xv, MT, KT, n0, nr, M, y, ldy);
    }
    release_tiles();
  });
#else
  (void)x, (void)M, (void)ldx, (void)K, (void)w, (void)N, (void)y, (void)ldy;
  TORCH_CHECK(false, "amx_bf16_gemm: not built into this instruction-set variant");
#endif
}

}  // namespace lowbit::LOWBIT_ISA
