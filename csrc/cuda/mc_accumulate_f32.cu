// mc_accumulate for f32 samples: every register bucket, both access modes, the
// resampled read and the class-chunked path.
#include "cuda/mc_kernels.cuh"

namespace uce_cuda {
namespace detail {

template cudaError_t launch_mc_state<DType::kFloat32, false>(
    const McArgs&, float*, cudaStream_t);

}  // namespace detail
}  // namespace uce_cuda
