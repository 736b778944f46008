// Per-dtype launchers of the streaming Monte-Carlo kernels, declared here and
// explicitly instantiated in mc_accumulate_*.cu and mc_reduce_*.cu, so the
// dtype switch (mc_launch.cu) compiles no kernel itself and the
// instantiations build in parallel.
#pragma once

#include "cuda/mc_cuda.h"
#include "cuda/uce_launchers.h"

namespace uce_cuda {
namespace detail {

// Class-chunked path (C > kRegisterMaxClasses): threads per block and pixels
// per thread, 4 when the samples are read as they are (one 16-byte fp32 /
// 8-byte fp16 access per class row), 2 when they are resampled (each value
// is 4 loads, and every pixel holds 4 offsets and 4 weights in registers).
// Classes per chunk and the shared-memory budget are those of the fused
// kernels' chunked path (kChunkClasses, kChunkSmemBytes).
constexpr int kMcChunkThreads = 64;
constexpr int kMcChunkPixels = 4;
constexpr int kMcChunkPixelsInterp = 2;

// Whether the samples are resampled (in != out in either dim).
inline bool mc_interp(const McArgs& a) {
  return a.in_h != a.out_h || a.in_w != a.out_w;
}

// Launch plan of the class-chunked path, shared by the launcher and by
// mc_scratch_floats so both agree on the scratch size.
ChunkPlan mc_chunk_plan(const McArgs& a);

// kReduce = false: mc_accumulate (state updated in place); true: mc_reduce.
template <DType ST, bool kReduce>
cudaError_t launch_mc_state(const McArgs& a, float* scratch,
                            cudaStream_t stream);

}  // namespace detail
}  // namespace uce_cuda
