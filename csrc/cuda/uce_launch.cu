// The extern launchers: a switch over the dtype tags onto the per-dtype
// launchers (instantiated in fused_*.cu, mc_uncertainty.cu, ce_backward.cu),
// and the launch plan of the class-chunked path. No kernel is compiled here.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/uce_cuda.h"
#include "cuda/uce_launchers.h"

namespace uce_cuda {
namespace detail {

ChunkPlan chunk_plan(const ForwardArgs& a) {
  ChunkPlan p;
  const int64_t pixels = static_cast<int64_t>(kChunkThreads) * kChunkPixels;
  p.tiles = (a.B * a.N + pixels - 1) / pixels;
  const int64_t norm_floats = 2 * a.beta * pixels;  // per block
  const int64_t max_grid = 0x7fffffff;
  if (norm_floats * static_cast<int64_t>(sizeof(float)) <= kChunkSmemBytes) {
    p.grid = p.tiles < max_grid ? p.tiles : max_grid;
    p.smem_bytes = static_cast<size_t>(norm_floats) * sizeof(float);
    return p;
  }
  // Normalisers in global scratch, one slice per block: a grid of a few
  // blocks per SM (grid-stride over the tiles) bounds the scratch to
  // ~ 8 * SMs * 2 * beta * 256 floats instead of 2 * beta per pixel.
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
  p.scratch_floats = p.grid * norm_floats;
  return p;
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
  using detail::launch_ce;
  using detail::launch_fused;
  using detail::launch_mc;
  if (a.input == nullptr) {  // mc_uncertainty
    switch (a.samples_dtype) {
      case DType::kFloat32:
        return launch_mc<DType::kFloat32>(a, scratch, stream);
      case DType::kFloat16:
        return launch_mc<DType::kFloat16>(a, scratch, stream);
      case DType::kBFloat16:
        return launch_mc<DType::kBFloat16>(a, scratch, stream);
    }
    return cudaErrorInvalidValue;
  }
  if (a.samples == nullptr) {  // sigma given
    switch (a.input_dtype) {
      case DType::kFloat32:
        return launch_ce<DType::kFloat32>(a, stream);
      case DType::kFloat16:
        return launch_ce<DType::kFloat16>(a, stream);
      case DType::kBFloat16:
        return launch_ce<DType::kBFloat16>(a, stream);
    }
    return cudaErrorInvalidValue;
  }

#define UCE_FUSED_CASE(IT)                                          \
  case DType::IT:                                                   \
    switch (a.samples_dtype) {                                      \
      case DType::kFloat32:                                         \
        return launch_fused<DType::IT, DType::kFloat32>(a, scratch, \
                                                        stream);    \
      case DType::kFloat16:                                         \
        return launch_fused<DType::IT, DType::kFloat16>(a, scratch, \
                                                        stream);    \
      case DType::kBFloat16:                                        \
        return launch_fused<DType::IT, DType::kBFloat16>(a, scratch, \
                                                         stream);   \
    }                                                               \
    return cudaErrorInvalidValue;

  switch (a.input_dtype) {
    UCE_FUSED_CASE(kFloat32)
    UCE_FUSED_CASE(kFloat16)
    UCE_FUSED_CASE(kBFloat16)
  }
#undef UCE_FUSED_CASE
  return cudaErrorInvalidValue;
}

cudaError_t backward(const BackwardArgs& a, cudaStream_t stream) {
  switch (a.input_dtype) {
    case DType::kFloat32:
      return detail::launch_backward<DType::kFloat32>(a, stream);
    case DType::kFloat16:
      return detail::launch_backward<DType::kFloat16>(a, stream);
    case DType::kBFloat16:
      return detail::launch_backward<DType::kBFloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace uce_cuda
