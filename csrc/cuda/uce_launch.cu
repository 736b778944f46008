// The extern launchers: a switch over the dtype tags onto the per-dtype
// launchers (instantiated in fused_*.cu and ce_backward.cu), and the launch
// plan of the class-chunked paths. No kernel is compiled here.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/uce_cuda.h"
#include "cuda/uce_launchers.h"

namespace uce_cuda {
namespace detail {

ChunkPlan plan_chunks(int64_t pixels, int64_t tile_pixels,
                      int64_t block_floats) {
  ChunkPlan p;
  p.tiles = (pixels + tile_pixels - 1) / tile_pixels;
  const int64_t max_grid = 0x7fffffff;
  if (block_floats * static_cast<int64_t>(sizeof(float)) <= kChunkSmemBytes) {
    p.grid = p.tiles < max_grid ? p.tiles : max_grid;
    p.smem_bytes = static_cast<size_t>(block_floats) * sizeof(float);
    return p;
  }
  // Statistics in global scratch, one slice per block: a grid of a few
  // blocks per SM (grid-stride over the tiles) bounds the scratch to
  // ~ 8 * SMs * block_floats instead of a slice per tile.
  int device = 0;
  int sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) !=
          cudaSuccess ||
      sms <= 0) {
    (void)cudaGetLastError();  // clear it: the launch check reads it
    sms = 128;
  }
  const int64_t cap = 8 * static_cast<int64_t>(sms);
  p.grid = p.tiles < cap ? p.tiles : cap;
  p.smem_bytes = 0;
  p.scratch_floats = p.grid * block_floats;
  return p;
}

ChunkPlan chunk_plan(const ForwardArgs& a) {
  const int64_t pixels = static_cast<int64_t>(kChunkThreads) * kChunkPixels;
  return plan_chunks(a.B * a.N, pixels, 2 * a.beta * pixels);
}

}  // namespace detail

int64_t forward_scratch_floats(const ForwardArgs& a) {
  if (a.samples == nullptr || a.C <= detail::kRegisterMaxClasses ||
      a.B * a.N == 0) {
    return 0;
  }
  return detail::chunk_plan(a).scratch_floats;
}

cudaError_t forward(const ForwardArgs& a, float* scratch, cudaStream_t stream) {
  using detail::with_dtype;
  if (a.samples == nullptr) {  // sigma given
    return with_dtype(a.input_dtype, [&](auto it) {
      return detail::launch_ce<decltype(it)::value>(a, stream);
    });
  }
  return with_dtype(a.input_dtype, [&](auto it) {
    return with_dtype(a.samples_dtype, [&](auto st) {
      return detail::launch_fused<decltype(it)::value, decltype(st)::value>(
          a, scratch, stream);
    });
  });
}

cudaError_t backward(const BackwardArgs& a, cudaStream_t stream) {
  return detail::with_dtype(a.input_dtype, [&](auto it) {
    return detail::launch_backward<decltype(it)::value>(a, stream);
  });
}

}  // namespace uce_cuda
