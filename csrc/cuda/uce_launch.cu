// The extern launchers of uce_forward / uce_backward: a switch over the dtype
// tags onto the per-dtype launchers (instantiated in fused_*.cu and
// ce_backward.cu). No kernel is compiled here.
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mc_launchers.h"
#include "cuda/uce_cuda.h"
#include "cuda/uce_launchers.h"

namespace uce_cuda {

int64_t forward_scratch_floats(const ForwardArgs& a) {
  if (a.samples == nullptr || a.C <= detail::kRegisterMaxClasses ||
      a.B * a.N == 0) {
    return 0;
  }
  // The fused forward keeps no entropy (FusedCe::kEntropy).
  return detail::mc_chunk_plan(detail::fused_mc_args(a), false).scratch_floats;
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
