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
  const int64_t pixels =
      static_cast<int64_t>(kMcChunkThreads) *
      (mc_interp(a) ? kMcChunkPixelsInterp : kMcChunkPixels);
  return plan_chunks(a.B * a.out_h * a.out_w, pixels, 3 * a.S * pixels);
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
