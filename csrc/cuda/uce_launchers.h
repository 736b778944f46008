// Per-dtype launchers, declared here and explicitly instantiated in the .cu
// file for each input dtype, so the dtype switch (uce_launch.cu) does not
// compile any kernel itself and the instantiations build in parallel.
#pragma once

#include "cuda/uce_cuda.h"

namespace uce_cuda {
namespace detail {

// Classes up to which the fused Monte-Carlo pass keeps per-class Welford
// state in registers; beyond it the class-chunked path runs.
constexpr int64_t kRegisterMaxClasses = 64;

// Class-chunked path: threads per block, pixels per thread, classes per
// chunk, and the dynamic shared-memory budget for the per-sample normalisers:
// the default 48 KiB per-block limit (so no opt-in attribute is needed) less
// room for the kernel's static shared memory, which counts against it too.
constexpr int kChunkThreads = 64;
constexpr int kChunkPixels = 4;
constexpr int kChunkClasses = 8;
constexpr int64_t kChunkSmemBytes = 48 * 1024 - 256;

// Launch plan of a class-chunked path, shared by its launcher and by its
// scratch-size query so both agree on the scratch size.
struct ChunkPlan {
  int64_t tiles = 0;         // tiles of pixels
  int64_t grid = 0;          // blocks launched (grid-stride over the tiles)
  size_t smem_bytes = 0;     // dynamic shared memory (0: scratch instead)
  int64_t scratch_floats = 0;
};
// `pixels` in tiles of `tile_pixels`, each block needing `block_floats` of
// per-sample statistics: in dynamic shared memory while they fit in
// kChunkSmemBytes, else in a global scratch slice per block with the grid
// capped at a few blocks per SM.
ChunkPlan plan_chunks(int64_t pixels, int64_t tile_pixels,
                      int64_t block_floats);
// The fused forward's plan: 2 * beta floats (max, 1/sum) per pixel.
ChunkPlan chunk_plan(const ForwardArgs& a);

// Calls f(DTypeTag<d>{}) with the dtype tag as a compile-time constant;
// cudaErrorInvalidValue for a value outside the enum.
template <DType D>
struct DTypeTag {
  static constexpr DType value = D;
};

template <typename F>
cudaError_t with_dtype(DType d, const F& f) {
  switch (d) {
    case DType::kFloat32:
      return f(DTypeTag<DType::kFloat32>{});
    case DType::kFloat16:
      return f(DTypeTag<DType::kFloat16>{});
    case DType::kBFloat16:
      return f(DTypeTag<DType::kBFloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Fused forward: Monte-Carlo statistics of the samples, then the weighted CE
// of the logits, one launch.
template <DType IT, DType ST>
cudaError_t launch_fused(const ForwardArgs& a, float* scratch,
                         cudaStream_t stream);
// uce_forward with sigma given: the weighted CE alone.
template <DType IT>
cudaError_t launch_ce(const ForwardArgs& a, cudaStream_t stream);
template <DType IT>
cudaError_t launch_backward(const BackwardArgs& a, cudaStream_t stream);

}  // namespace detail
}  // namespace uce_cuda
