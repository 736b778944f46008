// Launch parameters of the Monte-Carlo kernels (mc_kernels.cuh), which serve
// mc_accumulate_, mc_reduce and the fused forward, and their per-dtype
// launchers, declared here and explicitly instantiated in mc_accumulate_*.cu,
// mc_reduce_*.cu and fused_*.cu, so the dtype switches (mc_launch.cu,
// uce_launch.cu) compile no kernel themselves and the instantiations build in
// parallel.
#pragma once

#include "cuda/mc_cuda.h"
#include "cuda/uce_launchers.h"

namespace uce_cuda {
namespace detail {

// Classes up to which the per-class Welford state is kept in registers;
// beyond it the class-chunked path runs.
constexpr int64_t kRegisterMaxClasses = 64;

// Class-chunked path: threads per block; pixels per thread, 4 when the
// samples are read as they are (one 16-byte fp32 / 8-byte fp16 access per
// class row), 2 when they are resampled (each value is 4 loads, and every
// pixel holds 4 offsets and 4 weights in registers); classes per chunk; and
// the dynamic shared-memory budget for the per-sample statistics: the
// default 48 KiB per-block limit (so no opt-in attribute is needed) less room
// for the kernel's static shared memory, which counts against it too.
constexpr int kChunkThreads = 64;
constexpr int kChunkPixels = 4;
constexpr int kChunkPixelsInterp = 2;
constexpr int kChunkClasses = 8;
constexpr int64_t kChunkSmemBytes = 48 * 1024 - 256;

// Floats per sample and pixel of the class-chunked path's statistics: max
// and sum of exp, and with the entropy the entropy sum.
template <bool kEntropy>
constexpr int kStatRows = kEntropy ? 3 : 2;

// Launch plan of the class-chunked path, shared by its launcher and by the
// scratch-size queries so both agree on the scratch size.
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

// Whether the samples are resampled (in != out in either dim).
inline bool mc_interp(const McArgs& a) {
  return a.in_h != a.out_h || a.in_w != a.out_w;
}

// The class-chunked plan of a, with or without the entropy row.
ChunkPlan mc_chunk_plan(const McArgs& a, bool entropy);

// The Monte-Carlo arguments of the fused forward: its beta samples read as
// they are (1 x N), from an empty state (count = 0), sigma with f's
// correction.
inline McArgs fused_mc_args(const ForwardArgs& f) {
  McArgs a;
  a.S = f.beta;
  a.B = f.B;
  a.C = f.C;
  a.in_h = a.out_h = 1;
  a.in_w = a.out_w = f.N;
  a.samples = f.samples;
  a.samples_dtype = f.samples_dtype;
  a.inv_denom = f.inv_denom;
  return a;
}

// kReduce = false: mc_accumulate (state updated in place); true: mc_reduce.
template <DType ST, bool kReduce>
cudaError_t launch_mc_state(const McArgs& a, float* scratch,
                            cudaStream_t stream);

}  // namespace detail
}  // namespace uce_cuda
