// Host-side interface of the streaming Monte-Carlo kernels (mc_accumulate_,
// mc_reduce): plain pointers, sizes, a dtype tag and a stream, no torch
// headers; the torch-facing glue is mc_cuda.cpp.
//
// Layout (the op contract in uce_fast/ops.py), all contiguous: samples
// (S, B, C, in_h * in_w); state mean / m2 (B, C, N) and entropy (B, N),
// float32, N = out_h * out_w; outputs (B, N) and mean_probs (B, C, N). All
// offsets are int64.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "cuda/uce_cuda.h"

namespace uce_cuda {

struct McArgs {
  int64_t S = 0;  // samples in this call (0: samples == nullptr)
  int64_t B = 0, C = 0;
  // Samples are bilinearly resampled from in_h x in_w to out_h x out_w on the
  // fly when the sizes differ, and read as (S, B, C, N) when they are equal.
  int64_t in_h = 0, in_w = 0, out_h = 0, out_w = 0;
  bool align_corners = false;
  const void* samples = nullptr;
  DType samples_dtype = DType::kFloat32;

  // Samples already in the state. 0: the state is not read (its contents are
  // garbage for mc_accumulate, the pointers may be nullptr for mc_reduce).
  int64_t count = 0;
  // mc_accumulate: updated in place. mc_reduce: read only.
  float* mean = nullptr;
  float* m2 = nullptr;
  float* entropy = nullptr;

  // mc_reduce outputs. entropy_out / mutual_info_out (both or neither) and
  // probs_out are nullptr when not wanted.
  float inv_denom = 0.0f;  // 1 / (count + S - correction)
  float* sigma_out = nullptr;
  int64_t* pred_out = nullptr;
  float* entropy_out = nullptr;
  float* mutual_info_out = nullptr;
  float* probs_out = nullptr;
};

// Floats of device scratch that mc_accumulate / mc_reduce need for these
// arguments: 0 except on the class-chunked path (C > 64) with so many samples
// in one call that their per-sample softmax statistics do not fit in shared
// memory.
int64_t mc_scratch_floats(const McArgs& a);

// Enqueue the kernels on `stream`; they return without synchronising. scratch
// must hold mc_scratch_floats(a) floats (may be nullptr when that is 0).
// Require B * N > 0 and C >= 1.
cudaError_t mc_accumulate(const McArgs& a, float* scratch, cudaStream_t stream);
cudaError_t mc_reduce(const McArgs& a, float* scratch, cudaStream_t stream);

}  // namespace uce_cuda
