// A small emulation of the CUDA runtime and device intrinsics, enough to
// compile the torch-free kernels of csrc/cuda as host C++ (C++20) and run
// them on the CPU. It checks what a GPU would not report:
//  * a block's threads are real threads (a pool) running concurrently, so
//    __syncthreads is a barrier and warp shuffles go through a per-warp
//    exchange buffer with a warp barrier;
//  * dynamic shared memory is a fresh allocation of exactly the launch's byte
//    count per block (AddressSanitizer sees any access past it), filled with
//    NaN; launches asking for more than 48 KiB are refused with
//    cudaErrorInvalidValue;
//  * __ldg aborts on a pointer misaligned for its type (vector loads);
//  * the multiprocessor count, a cap on the blocks run (gridDim.x is reduced:
//    every kernel is a grid-stride loop, so results must not change) and the
//    order of the blocks are set by the tests (configure()).
// Blocks run one after another, so `__shared__` variables are function
// statics. Not emulated: device math accuracy (exp2f etc. are the host's
// correctly rounded functions), FMA contraction, occupancy, the memory model,
// static shared memory limits, partial-warp shuffles.
#pragma once

#include <cxxabi.h>
#include <dlfcn.h>

#include <array>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <semaphore>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#define UCE_CUDA_HOST 1

// ---------------------------------------------------------------------------
// Qualifiers and the launch syntax (see csrc/cuda/device_compat.h).

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define UCE_LAUNCH(grid, block, smem, stream, ...) \
  ::cuda_host::Launcher((grid), (block), (smem), (stream), __VA_ARGS__)
#define UCE_DYNAMIC_SHARED(T, name) \
  T* const name = ::cuda_host::dynamic_shared<T>()

// ---------------------------------------------------------------------------
// Runtime types.

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1,
                 unsigned int vz = 1)
      : x(vx), y(vy), z(vz) {}
};
struct uint3 {
  unsigned int x, y, z;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

// Values as in CUDA's driver_types.h.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevice = 101,
};
using cudaError = cudaError_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
struct CUstream_st;
using cudaStream_t = CUstream_st*;

// The built-in index variables of the thread running a kernel.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};

namespace cuda_host {

// Settings of the emulated device (tests set them through configure()).
struct Config {
  int sm_count = 132;             // cudaDevAttrMultiProcessorCount
  bool fail_device_query = false;  // cudaDeviceGetAttribute fails
  int64_t max_blocks = 0;         // > 0: blocks run (gridDim.x) capped
  bool reverse_blocks = false;    // run the blocks from the last to the first
};
inline Config& config() {
  static Config c;
  return c;
}

// One line per launch, for the tests to see which kernel ran how.
struct LaunchRecord {
  std::string kernel;  // demangled name of the kernel instantiation
  unsigned int grid;   // gridDim.x asked for
  unsigned int grid_run;
  unsigned int block;
  size_t smem_bytes;
  cudaError_t result;
};
inline std::vector<LaunchRecord>& launch_log() {
  static std::vector<LaunchRecord> log;
  return log;
}

inline cudaError_t& last_error() {
  static cudaError_t e = cudaSuccess;
  return e;
}

inline const char* error_name(cudaError_t e) {
  switch (e) {
    case cudaSuccess:
      return "cudaSuccess";
    case cudaErrorInvalidValue:
      return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration:
      return "cudaErrorInvalidConfiguration";
    case cudaErrorInvalidDevice:
      return "cudaErrorInvalidDevice";
  }
  return "unknown cudaError_t";
}

[[noreturn]] inline void fail(const std::string& what);

// ---------------------------------------------------------------------------
// Blocks.

constexpr unsigned int kWarp = 32;
constexpr unsigned int kMaxThreads = 1024;
constexpr size_t kMaxDynamicShared = 48 * 1024;

// State shared by the threads of the running block.
struct Block {
  const char* kernel = "";
  unsigned int threads = 0;
  std::unique_ptr<std::barrier<>> sync;              // __syncthreads
  std::vector<std::unique_ptr<std::barrier<>>> warp;  // per-warp barrier
  std::vector<std::array<std::array<unsigned char, 8>, kWarp>> exchange;
  std::unique_ptr<unsigned char[]> shared;  // dynamic shared memory
};
inline thread_local Block* current_block = nullptr;

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(current_block->shared.get());
}

// Persistent worker threads; run(n, body) runs body(t) on threads t < n
// concurrently and returns when all have finished. Each worker waits on its
// own semaphore, so a block wakes exactly its threads.
class Pool {
 public:
  static Pool& get() {
    static Pool pool;
    return pool;
  }

  void run(unsigned int n, const std::function<void(unsigned int)>& body) {
    while (workers_.size() < n) {
      auto w = std::make_unique<Worker>();
      Worker* raw = w.get();
      const auto id = static_cast<unsigned int>(workers_.size());
      w->thread = std::thread([this, raw, id] { loop(*raw, id); });
      workers_.push_back(std::move(w));
    }
    body_ = &body;
    pending_.store(n);
    for (unsigned int t = 0; t < n; ++t) workers_[t]->go.release();
    done_.acquire();
  }

  ~Pool() {
    stop_ = true;
    for (auto& w : workers_) w->go.release();
    for (auto& w : workers_) w->thread.join();
  }

 private:
  struct Worker {
    std::binary_semaphore go{0};
    std::thread thread;
  };

  void loop(Worker& w, unsigned int id) {
    for (;;) {
      w.go.acquire();
      if (stop_) return;
      (*body_)(id);
      if (pending_.fetch_sub(1) == 1) done_.release();
    }
  }

  std::vector<std::unique_ptr<Worker>> workers_;
  const std::function<void(unsigned int)>* body_ = nullptr;
  std::atomic<unsigned int> pending_{0};
  std::binary_semaphore done_{0};
  bool stop_ = false;
};

inline std::string kernel_name(const void* fn) {
  Dl_info info{};
  if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr) return "?";
  int status = 0;
  char* d = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
  std::string name = status == 0 && d != nullptr ? d : info.dli_sname;
  std::free(d);
  return name;
}

// Runs `thread_body` (the kernel with its arguments) as a grid of blocks.
inline cudaError_t launch(const std::string& kernel, dim3 grid, dim3 block,
                          size_t smem,
                          const std::function<void()>& thread_body) {
  static std::mutex one_launch_at_a_time;  // `__shared__` are statics
  const std::lock_guard<std::mutex> lock(one_launch_at_a_time);
  LaunchRecord rec{kernel, grid.x, 0, block.x, smem, cudaSuccess};
  if (grid.y != 1 || grid.z != 1 || block.y != 1 || block.z != 1) {
    fail("only 1-D grids and blocks are emulated (" + kernel + ")");
  }
  if (grid.x == 0 || block.x == 0 || block.x > kMaxThreads) {
    rec.result = cudaErrorInvalidConfiguration;
  } else if (smem > kMaxDynamicShared) {
    rec.result = cudaErrorInvalidValue;  // needs an opt-in attribute on a GPU
  }
  if (rec.result != cudaSuccess) {
    last_error() = rec.result;
    launch_log().push_back(rec);
    return rec.result;
  }
  const Config& cfg = config();
  const unsigned int blocks =
      cfg.max_blocks > 0 && grid.x > cfg.max_blocks
          ? static_cast<unsigned int>(cfg.max_blocks)
          : grid.x;
  rec.grid_run = blocks;
  const unsigned int n = block.x;
  const unsigned int warps = (n + kWarp - 1) / kWarp;

  for (unsigned int i = 0; i < blocks; ++i) {
    const unsigned int b = cfg.reverse_blocks ? blocks - 1 - i : i;
    Block blk;
    blk.kernel = kernel.c_str();
    blk.threads = n;
    blk.sync = std::make_unique<std::barrier<>>(n);
    for (unsigned int w = 0; w < warps; ++w) {
      const unsigned int lanes = w + 1 < warps ? kWarp : n - w * kWarp;
      blk.warp.push_back(std::make_unique<std::barrier<>>(lanes));
    }
    blk.exchange.resize(warps);
    // Exactly `smem` bytes, NaN-filled: a read before a write shows as NaN,
    // an access past the end is a heap overflow for AddressSanitizer.
    blk.shared.reset(new unsigned char[smem]);
    const uint32_t nan = 0x7fc00000u;
    for (size_t off = 0; off < smem; off += sizeof(nan)) {
      std::memcpy(blk.shared.get() + off, &nan,
                  smem - off < sizeof(nan) ? smem - off : sizeof(nan));
    }
    Pool::get().run(n, [&](unsigned int t) {
      threadIdx = uint3{t, 0, 0};
      blockIdx = uint3{b, 0, 0};
      blockDim = dim3(n);
      gridDim = dim3(blocks);
      current_block = &blk;
      thread_body();
      // An exited thread no longer takes part in the barriers.
      blk.warp[t / kWarp]->arrive_and_drop();
      blk.sync->arrive_and_drop();
      current_block = nullptr;
    });
  }
  launch_log().push_back(rec);
  return cudaSuccess;
}

// UCE_LAUNCH(grid, block, smem, stream, kernel)(args...): the arguments are
// converted to the kernel's parameter types once, as the launch copies them;
// every thread then receives its own copy of those values.
template <typename... P>
class Launcher {
 public:
  Launcher(dim3 grid, dim3 block, size_t smem, cudaStream_t,
           void (*kernel)(P...))
      : grid_(grid), block_(block), smem_(smem), kernel_(kernel) {}

  template <typename... A>
  void operator()(A&&... args) const {
    const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
    const auto kernel = kernel_;
    launch(kernel_name(reinterpret_cast<const void*>(kernel)), grid_, block_,
           smem_, [&] { std::apply(kernel, params); });
  }

 private:
  dim3 grid_, block_;
  size_t smem_;
  void (*kernel_)(P...);
};
template <typename... P>
Launcher(dim3, dim3, size_t, cudaStream_t, void (*)(P...)) -> Launcher<P...>;

[[noreturn]] inline void fail(const std::string& what) {
  // The first thread to fail reports and aborts; others of the block wait.
  static std::atomic<bool> failed{false};
  if (failed.exchange(true)) {
    for (;;) std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  std::fprintf(stderr, "cuda_host: %s\n", what.c_str());
  if (current_block != nullptr) {
    std::fprintf(stderr, "cuda_host:   in %s, block %u, thread %u\n",
                 current_block->kernel, blockIdx.x, threadIdx.x);
  }
  std::fflush(stderr);
  std::abort();
}

}  // namespace cuda_host

// ---------------------------------------------------------------------------
// Runtime API.

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_host::last_error();
  cuda_host::last_error() = cudaSuccess;
  return e;
}
inline cudaError_t cudaPeekAtLastError() { return cuda_host::last_error(); }
inline const char* cudaGetErrorString(cudaError_t e) {
  return cuda_host::error_name(e);
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr,
                                          int device) {
  const cuda_host::Config& cfg = cuda_host::config();
  if (cfg.fail_device_query || device != 0 ||
      attr != cudaDevAttrMultiProcessorCount) {
    cuda_host::last_error() = cudaErrorInvalidDevice;
    return cudaErrorInvalidDevice;
  }
  *value = cfg.sm_count;
  return cudaSuccess;
}

// ---------------------------------------------------------------------------
// Device intrinsics.

inline void __syncthreads() {
  cuda_host::current_block->sync->arrive_and_wait();
}

// Only full-warp shuffles (mask 0xffffffff, width 32, 32 threads in the warp)
// are emulated, the only kind the kernels use.
template <typename T>
T __shfl_down_sync(unsigned int mask, T var, unsigned int delta,
                   int width = 32) {
  static_assert(sizeof(T) <= 8, "shuffles of at most 8 bytes");
  cuda_host::Block& b = *cuda_host::current_block;
  const unsigned int warp = threadIdx.x / cuda_host::kWarp;
  const unsigned int lane = threadIdx.x % cuda_host::kWarp;
  if (mask != 0xffffffffu || width != 32 ||
      (warp + 1) * cuda_host::kWarp > b.threads) {
    cuda_host::fail("__shfl_down_sync: only full-warp shuffles are emulated");
  }
  std::memcpy(b.exchange[warp][lane].data(), &var, sizeof(T));
  b.warp[warp]->arrive_and_wait();
  T out = var;
  if (lane + delta < cuda_host::kWarp) {
    std::memcpy(&out, b.exchange[warp][lane + delta].data(), sizeof(T));
  }
  b.warp[warp]->arrive_and_wait();  // the buffer is reused by the next one
  return out;
}

template <typename T>
T __ldg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {
    char msg[160];
    std::snprintf(msg, sizeof(msg),
                  "misaligned __ldg: %zu-byte load at %p needs %zu-byte "
                  "alignment",
                  sizeof(T), static_cast<const void*>(p), alignof(T));
    cuda_host::fail(msg);
  }
  return *p;
}

inline long long atomicMin(long long* address, long long val) {
  std::atomic_ref<long long> a(*address);
  long long old = a.load();
  while (val < old && !a.compare_exchange_weak(old, val)) {
  }
  return old;
}

inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, sizeof(f));
  return f;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, sizeof(i));
  return i;
}

// Correctly rounded single operations; the host build of the kernels uses
// -ffp-contract=off, so nothing is fused into an FMA.
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

// ---------------------------------------------------------------------------
// float16 / bfloat16 as raw 16-bit values. Conversions from float round to
// nearest even; NaN becomes the canonical NaN 0x7fff, as the hardware's
// cvt.rn.f16.f32 / cvt.rn.bf16.f32.

struct __half {
  unsigned short x;
};
struct __nv_bfloat16 {
  unsigned short x;
};

inline __half __ushort_as_half(unsigned short v) { return __half{v}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short v) {
  return __nv_bfloat16{v};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000u) << 16;
  const uint32_t e = (h.x >> 10) & 0x1fu;
  const uint32_t m = h.x & 0x3ffu;
  if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
    const float v = static_cast<float>(m) * 5.9604644775390625e-08f;
    return sign != 0 ? -v : v;
  }
  if (e == 0x1f) return __uint_as_float(sign | 0x7f800000u | (m << 13));
  return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  const auto sign = static_cast<unsigned short>((u >> 16) & 0x8000u);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{0x7fff};
  // 65520 (halfway between 65504 and 2^16) and above round to inf.
  if (a >= 0x477ff000u) {
    return __half{static_cast<unsigned short>(sign | 0x7c00u)};
  }
  uint32_t q, rem, halfway;
  if (a < 0x38800000u) {  // below 2^-14: a multiple of 2^-24 (or 0)
    if (a < 0x33000000u) return __half{sign};  // below 2^-25: 0
    const uint32_t shift = 126u - (a >> 23);    // 14 .. 24
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    q = m >> shift;
    rem = m & ((1u << shift) - 1u);
    halfway = 1u << (shift - 1u);
  } else {  // normal: rebias the exponent, keep 10 mantissa bits
    const uint32_t r = a - 0x38000000u;
    q = r >> 13;
    rem = r & 0x1fffu;
    halfway = 0x1000u;
  }
  if (rem > halfway || (rem == halfway && (q & 1u) != 0)) ++q;
  return __half{static_cast<unsigned short>(sign | q)};
}

inline float __bfloat162float(__nv_bfloat16 h) {
  return __uint_as_float(static_cast<uint32_t>(h.x) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{0x7fff};
  return __nv_bfloat16{
      static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}
