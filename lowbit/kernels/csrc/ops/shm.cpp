// The shared-memory all-reduce's publish, wait and sum (lowbit/distributed/shm_allreduce.py owns the
// segment, its layout and the slow path: deadlines, dead peers, back-off).
//
// Why in C++: between two ranks on one machine the collective's own work is a 2 KiB copy and an add;
// driven from Python (numpy flag reads in the spin, torch calls for the copy and the sum) each side paid
// ~15 us of interpreter and dispatch overhead per call, 60 calls per decode step of the default model.
// Here one call copies, publishes, spins with `pause` and sums, with the GIL released.
//
// Memory order: the slot's stores happen before the release store of the flag, and the flags are read
// with acquire loads before the slots are read (on x86 both are plain moves; the builtins keep the
// compiler from reordering them).
#include <immintrin.h>

#include <cstring>

#include "../api.h"

namespace lowbit::LOWBIT_ISA {

namespace {

constexpr int64_t kFlagStride = 64 / sizeof(int64_t);  // one flag per 64-byte line

inline bool all_published(const int64_t* flags, int64_t world, int64_t seq) {
  for (int64_t r = 0; r < world; ++r)
    if (__atomic_load_n(flags + r * kFlagStride, __ATOMIC_ACQUIRE) < seq) return false;
  return true;
}

}  // namespace

bool shm_all_reduce(const at::Tensor& t, int64_t flags_addr, int64_t bank_addr, int64_t slot_floats, int64_t world,
                    int64_t rank, int64_t seq, int64_t max_spins, bool publish) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu(),
              "shm_all_reduce: t must be a contiguous float32 CPU tensor");
  TORCH_CHECK(t.numel() <= slot_floats, "shm_all_reduce: ", t.numel(), " floats exceed a slot of ", slot_floats);
  TORCH_CHECK(world >= 1 && rank >= 0 && rank < world && flags_addr && bank_addr, "shm_all_reduce: bad segment");
  auto* flags = reinterpret_cast<int64_t*>(flags_addr);
  auto* bank = reinterpret_cast<float*>(bank_addr);
  float* out = t.data_ptr<float>();
  const int64_t n = t.numel();
  if (publish) {
    std::memcpy(bank + rank * slot_floats, out, n * sizeof(float));
    __atomic_store_n(flags + rank * kFlagStride, seq, __ATOMIC_RELEASE);
  }
  int64_t spins = 0;
  while (!all_published(flags, world, seq)) {
    if (++spins > max_spins) return false;
    _mm_pause();
  }
  // rank order, one add at a time: every rank gets bit-identical sums (and the Python path's)
  const float* s0 = bank;
  if (world == 1) {
    std::memcpy(out, s0, n * sizeof(float));
    return true;
  }
  const float* s1 = bank + slot_floats;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(s0 + i), _mm256_loadu_ps(s1 + i)));
  for (; i < n; ++i) out[i] = s0[i] + s1[i];
  for (int64_t r = 2; r < world; ++r) {
    const float* sr = bank + r * slot_floats;
    for (i = 0; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, _mm256_add_ps(_mm256_loadu_ps(out + i), _mm256_loadu_ps(sr + i)));
    for (; i < n; ++i) out[i] += sr[i];
  }
  return true;
}

}  // namespace lowbit::LOWBIT_ISA
