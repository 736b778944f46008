// Per-dtype launchers, declared here and explicitly instantiated in the .cu
// file for each input dtype, so the dtype switch (uce_launch.cu) does not
// compile any kernel itself and the instantiations build in parallel.
#pragma once

#include "cuda/uce_cuda.h"

namespace uce_cuda {
namespace detail {

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
// of the logits, one launch (the kernels of mc_kernels.cuh, instantiated in
// fused_*.cu).
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
