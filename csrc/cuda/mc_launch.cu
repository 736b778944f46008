// The extern launchers of the streaming Monte-Carlo ops: a switch over the
// samples dtype onto the per-dtype launchers (instantiated in
// mc_accumulate_*.cu and mc_reduce_*.cu), and the launch plan of the
// class-chunked path. No kernel is compiled here.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mc_cuda.h"
#include "cuda/mc_launchers.h"

namespace uce_cuda {
namespace detail {

ChunkPlan mc_chunk_plan(const McArgs& a) {
  ChunkPlan p;
  const int64_t pixels =
      static_cast<int64_t>(kMcChunkThreads) *
      (mc_interp(a) ? kMcChunkPixelsInterp : kMcChunkPixels);
  p.tiles = (a.B * a.out_h * a.out_w + pixels - 1) / pixels;
  const int64_t stat_floats = 3 * a.S * pixels;  // per block
  const int64_t max_grid = 0x7fffffff;
  if (stat_floats * static_cast<int64_t>(sizeof(float)) <= kChunkSmemBytes) {
    p.grid = p.tiles < max_grid ? p.tiles : max_grid;
    p.smem_bytes = static_cast<size_t>(stat_floats) * sizeof(float);
    return p;
  }
  // Per-sample statistics in global scratch, one slice per block: a grid of
  // a few blocks per SM (grid-stride over the tiles) bounds the scratch to
  // ~ 8 * SMs * 3 * S * P floats instead of 3 * S per pixel.
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
  p.scratch_floats = p.grid * stat_floats;
  return p;
}

}  // namespace detail

int64_t mc_scratch_floats(const McArgs& a) {
  if (a.S == 0 || a.C <= detail::kRegisterMaxClasses ||
      a.B * a.out_h * a.out_w == 0) {
    return 0;
  }
  return detail::mc_chunk_plan(a).scratch_floats;
}

namespace {

template <bool kReduce>
cudaError_t launch(const McArgs& a, float* scratch, cudaStream_t stream) {
  using detail::launch_mc_state;
  switch (a.samples_dtype) {
    case DType::kFloat32:
      return launch_mc_state<DType::kFloat32, kReduce>(a, scratch, stream);
    case DType::kFloat16:
      return launch_mc_state<DType::kFloat16, kReduce>(a, scratch, stream);
    case DType::kBFloat16:
      return launch_mc_state<DType::kBFloat16, kReduce>(a, scratch, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t mc_accumulate(const McArgs& a, float* scratch,
                          cudaStream_t stream) {
  return launch<false>(a, scratch, stream);
}

cudaError_t mc_reduce(const McArgs& a, float* scratch, cudaStream_t stream) {
  return launch<true>(a, scratch, stream);
}

}  // namespace uce_cuda
