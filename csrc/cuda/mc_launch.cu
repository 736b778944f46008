// The extern launchers of the streaming Monte-Carlo ops: a switch over the
// samples dtype onto the per-dtype launchers (instantiated in
// mc_accumulate_*.cu and mc_reduce_*.cu), and the launch plan of the
// class-chunked path (also the fused forward's). No kernel is compiled here.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mc_cuda.h"
#include "cuda/mc_launchers.h"

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

ChunkPlan mc_chunk_plan(const McArgs& a, bool entropy) {
  const int64_t pixels =
      static_cast<int64_t>(kChunkThreads) *
      (mc_interp(a) ? kChunkPixelsInterp : kChunkPixels);
  const int64_t rows = entropy ? kStatRows<true> : kStatRows<false>;
  return plan_chunks(a.B * a.out_h * a.out_w, pixels, rows * a.S * pixels);
}

}  // namespace detail

int64_t mc_scratch_floats(const McArgs& a) {
  if (a.S == 0 || a.C <= detail::kRegisterMaxClasses ||
      a.B * a.out_h * a.out_w == 0) {
    return 0;
  }
  // mc_accumulate and mc_reduce keep the entropy (Accumulate / Reduce).
  return detail::mc_chunk_plan(a, true).scratch_floats;
}

namespace {

template <bool kReduce>
cudaError_t launch(const McArgs& a, float* scratch, cudaStream_t stream) {
  return detail::with_dtype(a.samples_dtype, [&](auto st) {
    return detail::launch_mc_state<decltype(st)::value, kReduce>(a, scratch,
                                                                 stream);
  });
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
