// Helpers shared by the CPU kernel files: element loads/stores, tile sizes,
// scratch buffers, instruction-set detection, argument checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "common/uce_math.h"

#if defined(__x86_64__) || defined(__i386__)
#define UCE_X86 1
#define UCE_TARGET_AVX2 __attribute__((target("avx2,fma")))
#if defined(__clang__)
#define UCE_TARGET_AVX512                                              \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma"), \
                 min_vector_width(512)))
#else
#define UCE_TARGET_AVX512                                   \
  __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,fma," \
                        "prefer-vector-width=512")))
#endif
#endif

#if defined(__GNUC__) || defined(__clang__)
#define UCE_COLD __attribute__((noinline, cold))
#else
#define UCE_COLD
#endif

namespace uce_cpu {

using uce::bits_to_float;

// ---------------------------------------------------------------------------
// Element loads/stores. Reduced-precision inputs are widened to fp32 on load
// with pure bit manipulation (branch-free, so it vectorises inside the tile
// loops); all arithmetic is fp32.

UCE_INLINE float load_f(float v) { return v; }

UCE_INLINE float load_f(c10::BFloat16 v) {
  return bits_to_float(static_cast<uint32_t>(v.x) << 16);
}

// IEEE half -> float, the branch-free formulation: normals (and inf/NaN) by
// rebiasing the exponent with a multiply, subnormals via a magic-number
// subtraction, a select between the two.
UCE_INLINE float load_f(c10::Half v) {
  const uint32_t w = static_cast<uint32_t>(v.x) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = bits_to_float(0x7800000u);  // 2^-112
  const float normalized =
      bits_to_float((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float magic_bias = 0.5f;
  const float denormalized =
      bits_to_float((two_w >> 17) | magic_mask) - magic_bias;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t bits = sign | (two_w < denormalized_cutoff
                                    ? uce::float_to_bits(denormalized)
                                    : uce::float_to_bits(normalized));
  return bits_to_float(bits);
}

template <typename T>
UCE_INLINE T store_f(float v) {
  return static_cast<T>(v);  // round-to-nearest-even for half / bfloat16
}

// v rounded to the precision of T (what store_f<T> then load_f gives),
// branch-free so that it vectorises.
template <typename T>
UCE_INLINE float round_as(float v) {
  if constexpr (std::is_same<T, c10::Half>::value) {
    return uce::round_to_half(v);
  } else if constexpr (std::is_same<T, c10::BFloat16>::value) {
    return uce::round_to_bf16(v);
  } else {
    return v;
  }
}

// ---------------------------------------------------------------------------
// Tile sizes.
//
// Monte-Carlo pass: per tile we keep e (exp values), mean and M2, each
// C x T fp32, plus the C x T slice of the current sample that pass 2
// re-reads after pass 1 found the max: ~16 * C * T bytes of working set.
// Two effects pull T in opposite directions:
//  * the per-pixel reductions over classes (running max, running sum) are
//    serial dependency chains, one per vector of the tile; T needs to span
//    several vectors (>= 64 pixels) for the out-of-order core to overlap
//    them, and short rows also pay the per-row loop/prefetch overhead;
//  * the working set should stay in L1 (48 KiB) for small C, and at least
//    within L2 for large C.
// Measured on a (beta=10, fp32) stack with 48 KiB L1d / 2 MiB L2: C = 3 is
// fastest at T = 256, C = 19 and 40 at T = 128, C = 150 at T = 32-64; at
// C = 1000, T = 32/64 (0.5/1 MiB working set, served from L2) beat T = 8/16
// by 2x despite missing L1. The L2 budget below stays at 640 KiB so the
// working set also fits the smaller L2 of other cores.
// These T values also get compile-time trip counts (no remainder handling
// inside the class loops); the tail tile of a row uses the runtime-T
// instantiation.
inline int64_t mc_tile_size(int64_t C) {
  const int64_t ws = 16 * C;  // working-set bytes per pixel of the tile
  if (ws * 256 <= 48 * 1024) return 256;
  if (ws * 128 <= 96 * 1024) return 128;
  if (ws * 64 <= 640 * 1024) return 64;
  if (ws * 32 <= 640 * 1024) return 32;
  return 16;
}

// 64-byte aligned fp32 scratch, allocated once per parallel chunk.
class Scratch {
 public:
  explicit Scratch(int64_t n_floats) {
    const size_t bytes =
        ((static_cast<size_t>(std::max<int64_t>(n_floats, 1)) * sizeof(float) +
          63) /
         64) *
        64;
    ptr_ = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(ptr_ != nullptr, "uce_fast: failed to allocate ",
                bytes, " bytes of scratch");
  }
  ~Scratch() { std::free(ptr_); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  // Carves n floats (rounded up to a cache line) off the buffer.
  float* take(int64_t n) {
    float* p = ptr_ + used_;
    used_ += (n + 15) / 16 * 16;
    return p;
  }
  static int64_t size_of(int64_t n) { return (n + 15) / 16 * 16; }

 private:
  float* ptr_ = nullptr;
  int64_t used_ = 0;
};

// Prefetch the cache lines of a row of n elements starting at p.
template <typename T>
UCE_INLINE void prefetch_row(const T* p, int n) {
#if defined(__GNUC__) || defined(__clang__)
  const char* b = reinterpret_cast<const char*>(p);
  const int64_t bytes = static_cast<int64_t>(n) * sizeof(T);
  for (int64_t k = 0; k < bytes; k += 64) __builtin_prefetch(b + k, 0, 3);
  __builtin_prefetch(b + bytes - 1, 0, 3);
#else
  (void)p;
  (void)n;
#endif
}

// ---------------------------------------------------------------------------
// Instruction-set variants.

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa detect_isa() {
  Isa best = Isa::kGeneric;
#ifdef UCE_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
    best = Isa::kAvx2;
    if (__builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq")) {
      best = Isa::kAvx512;
    }
  }
#endif
  if (const char* cap = std::getenv("UCE_FAST_CPU_ISA")) {
    Isa want = best;
    if (std::strcmp(cap, "generic") == 0) want = Isa::kGeneric;
    if (std::strcmp(cap, "avx2") == 0) want = Isa::kAvx2;
    if (std::strcmp(cap, "avx512") == 0) want = Isa::kAvx512;
    if (static_cast<int>(want) < static_cast<int>(best)) best = want;
  }
  return best;
}

inline Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

// One kernel body compiled once per instruction set. `Body` has a static
// `run(const Arg&)`; isa_variant<Body, Arg>(isa) returns a function that runs
// it compiled for the generic target, AVX2+FMA or AVX-512 (the body is
// inlined into each clone, so the vectoriser targets that instruction set).
template <typename Body, typename Arg>
void run_generic(const Arg& a) {
  Body::run(a);
}
#ifdef UCE_X86
template <typename Body, typename Arg>
UCE_TARGET_AVX2 void run_avx2(const Arg& a) {
  Body::run(a);
}
template <typename Body, typename Arg>
UCE_TARGET_AVX512 void run_avx512(const Arg& a) {
  Body::run(a);
}
#endif

template <typename Body, typename Arg>
auto isa_variant(Isa isa) -> void (*)(const Arg&) {
#ifdef UCE_X86
  if (isa == Isa::kAvx512) return &run_avx512<Body, Arg>;
  if (isa == Isa::kAvx2) return &run_avx2<Body, Arg>;
#endif
  (void)isa;
  return &run_generic<Body, Arg>;
}

// The variant of `Tiled<kT>` (a Body per tile width) for tiles of T pixels: a
// fixed width (16..256) lets the compiler specialise the pixel loops; kT = 0
// takes the width at run time (tail tiles, or a width without a variant).
template <template <int> class Tiled, typename Arg>
auto tile_variant(Isa isa, int64_t T) -> void (*)(const Arg&) {
  switch (T) {
    case 256:
      return isa_variant<Tiled<256>, Arg>(isa);
    case 128:
      return isa_variant<Tiled<128>, Arg>(isa);
    case 64:
      return isa_variant<Tiled<64>, Arg>(isa);
    case 32:
      return isa_variant<Tiled<32>, Arg>(isa);
    case 16:
      return isa_variant<Tiled<16>, Arg>(isa);
    default:
      return isa_variant<Tiled<0>, Arg>(isa);
  }
}

// ---------------------------------------------------------------------------
// Drivers and argument checking.

// Enough work per chunk (~64K element-passes) to amortise the fork/join.
inline int64_t grain_for(int64_t elems_per_item) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, elems_per_item));
}

inline void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "uce_fast (CPU kernels): ", name,
              " must be a CPU tensor, got device ", t.device());
}

// Calls f with a value of the C++ element type of t (float, c10::Half or
// c10::BFloat16).
template <typename F>
void dispatch_float(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat:
      f(float{});
      return;
    case at::kHalf:
      f(c10::Half{});
      return;
    case at::kBFloat16:
      f(c10::BFloat16{});
      return;
    default:
      TORCH_CHECK(false, "uce_fast: unsupported dtype for ", name, ": ", t);
  }
}


}  // namespace uce_cpu
