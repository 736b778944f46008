// Argument checks and output allocation of the streaming Monte-Carlo ops
// (mc_accumulate_, mc_reduce), shared by the CPU and the CUDA glue. Host-only
// (ATen, no CUDA headers); each backend passes its own device check,
// `device_check(tensor, name)`, which raises for a tensor on the wrong device.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace uce_mc {

struct Geometry {
  int64_t in_plane;  // in_h * in_w
  int64_t N;         // out_h * out_w
  bool resample;     // the sizes differ: bilinear upsampling in the kernel
};

inline Geometry check_geometry(int64_t in_h, int64_t in_w, int64_t out_h,
                               int64_t out_w) {
  TORCH_CHECK_VALUE(in_h >= 0 && in_w >= 0 && out_h >= 0 && out_w >= 0,
                    "uce_fast: sizes must be non-negative, got in_size (",
                    in_h, ", ", in_w, "), out_size (", out_h, ", ", out_w,
                    ")");
  TORCH_CHECK_VALUE(in_h <= INT32_MAX && in_w <= INT32_MAX &&
                        out_h <= INT32_MAX && out_w <= INT32_MAX,
                    "uce_fast: spatial size too large");
  Geometry g;
  g.in_plane = in_h * in_w;
  g.N = out_h * out_w;
  g.resample = in_h != out_h || in_w != out_w;
  TORCH_CHECK_VALUE(!g.resample || g.N == 0 || (in_h > 0 && in_w > 0),
                    "uce_fast: cannot resample an empty (", in_h, ", ", in_w,
                    ") input to (", out_h, ", ", out_w, ")");
  return g;
}

// samples (S, B, C, in_h * in_w): float32/float16/bfloat16, contiguous;
// returns S.
template <typename DeviceCheck>
int64_t check_stream_samples(const at::Tensor& s, int64_t in_plane,
                             const DeviceCheck& device_check) {
  device_check(s, "samples");
  const auto t = s.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "uce_fast: samples must be float32, float16 or bfloat16, got ",
              t);
  TORCH_CHECK(s.is_contiguous(), "uce_fast: samples must be contiguous");
  TORCH_CHECK(s.dim() == 4,
              "uce_fast: samples must have shape (S, B, C, in_h * in_w), "
              "got ",
              s.sizes());
  TORCH_CHECK(s.size(3) == in_plane, "uce_fast: samples have ", s.size(3),
              " pixels per class, expected in_h * in_w = ", in_plane);
  TORCH_CHECK(s.size(2) >= 1, "uce_fast: samples must have at least one class");
  TORCH_CHECK(s.size(2) <= INT32_MAX, "uce_fast: samples has too many classes");
  TORCH_CHECK(s.size(0) <= INT32_MAX, "uce_fast: too many samples");
  return s.size(0);
}

// The state mean, m2 (B, C, N) and entropy (B, N): float32, contiguous.
template <typename DeviceCheck>
void check_state(const at::Tensor& mean, const at::Tensor& m2,
                 const at::Tensor& entropy, int64_t N,
                 const DeviceCheck& device_check) {
  const auto check_f32 = [&](const at::Tensor& t, const char* name) {
    device_check(t, name);
    TORCH_CHECK(t.scalar_type() == at::kFloat, "uce_fast: ", name,
                " must be float32, got ", t.scalar_type());
  };
  const auto check_bcn = [&](const at::Tensor& t, const char* name) {
    check_f32(t, name);
    TORCH_CHECK(t.dim() == 3 && t.size(2) == N, "uce_fast: ", name,
                " must have shape (B, C, ", N, "), got ", t.sizes());
    TORCH_CHECK(t.is_contiguous(), "uce_fast: ", name, " must be contiguous");
  };
  check_bcn(mean, "mean");
  check_bcn(m2, "m2");
  TORCH_CHECK(m2.sizes() == mean.sizes(), "uce_fast: m2 must have the shape ",
              mean.sizes(), " of mean, got ", m2.sizes());
  TORCH_CHECK(mean.size(1) >= 1,
              "uce_fast: the state must have at least one class");
  TORCH_CHECK(mean.size(1) <= INT32_MAX,
              "uce_fast: the state has too many classes");
  check_f32(entropy, "entropy");
  TORCH_CHECK(entropy.dim() == 2 && entropy.size(0) == mean.size(0) &&
                  entropy.size(1) == N,
              "uce_fast: entropy must have shape (", mean.size(0), ", ", N,
              "), got ", entropy.sizes());
  TORCH_CHECK(entropy.is_contiguous(), "uce_fast: entropy must be contiguous");
}

inline void check_samples_match(const at::Tensor& s, int64_t B, int64_t C,
                                int64_t in_plane) {
  TORCH_CHECK(s.size(1) == B && s.size(2) == C,
              "uce_fast: samples must have shape (S, ", B, ", ", C, ", ",
              in_plane, ") to match the state, got ", s.sizes());
}

struct Sizes {
  int64_t B = 0, C = 0, S = 0;
};

// mc_accumulate_'s tensors (after the geometry): returns (B, C, S).
template <typename DeviceCheck>
Sizes check_accumulate(const at::Tensor& mean, const at::Tensor& m2,
                       const at::Tensor& entropy, const at::Tensor& samples,
                       int64_t count, const Geometry& geo,
                       const DeviceCheck& device_check) {
  check_state(mean, m2, entropy, geo.N, device_check);
  Sizes z;
  z.S = check_stream_samples(samples, geo.in_plane, device_check);
  z.B = mean.size(0);
  z.C = mean.size(1);
  check_samples_match(samples, z.B, z.C, geo.in_plane);
  TORCH_CHECK_VALUE(count >= 0, "uce_fast: count must be >= 0, got ", count);
  return z;
}

// Which of mc_reduce's optional inputs are there (all three state tensors or
// none; a state when count > 0; samples or a state).
struct ReduceInputs {
  bool has_samples, has_state;
};

inline ReduceInputs check_reduce_inputs(
    const std::optional<at::Tensor>& samples,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& m2,
    const std::optional<at::Tensor>& entropy, int64_t count) {
  const auto given = [](const std::optional<at::Tensor>& t) {
    return t.has_value() && t->defined();
  };
  const int n_state = given(mean) + given(m2) + given(entropy);
  TORCH_CHECK(n_state == 0 || n_state == 3,
              "uce_fast: give all of mean, m2 and entropy or none of them");
  const ReduceInputs in{given(samples), n_state == 3};
  TORCH_CHECK_VALUE(count >= 0, "uce_fast: count must be >= 0, got ", count);
  TORCH_CHECK(count == 0 || in.has_state,
              "uce_fast: mean, m2 and entropy are required when count > 0");
  TORCH_CHECK(in.has_samples || in.has_state,
              "uce_fast: need samples or a state to reduce");
  return in;
}

// mc_reduce's tensors and correction: returns (B, C, S).
template <typename DeviceCheck>
Sizes check_reduce(const std::optional<at::Tensor>& samples,
                   const std::optional<at::Tensor>& mean,
                   const std::optional<at::Tensor>& m2,
                   const std::optional<at::Tensor>& entropy, int64_t count,
                   int64_t correction, const Geometry& geo,
                   const ReduceInputs& in, const DeviceCheck& device_check) {
  Sizes z;
  if (in.has_state) {
    check_state(*mean, *m2, *entropy, geo.N, device_check);
    z.B = mean->size(0);
    z.C = mean->size(1);
  }
  if (in.has_samples) {
    z.S = check_stream_samples(*samples, geo.in_plane, device_check);
    if (in.has_state) {
      check_samples_match(*samples, z.B, z.C, geo.in_plane);
    } else {
      z.B = samples->size(1);
      z.C = samples->size(2);
    }
  }
  const int64_t n = count + z.S;
  TORCH_CHECK_VALUE(correction >= 0 && correction < n,
                    "uce_fast: correction must be in [0, n) = [0, ", n,
                    ") for n = count + S samples, got ", correction);
  return z;
}

// mc_reduce's outputs (sigma, pred, entropy, mutual_info, mean_probs); the
// entropy pair and mean_probs are empty (0,) unless asked for.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
reduce_outputs(const at::Tensor& like, const Sizes& z, int64_t N,
               bool want_probs, bool want_entropy) {
  const auto opts = like.options().dtype(at::kFloat);
  const auto maps = [&](bool want) {
    return want ? at::empty({z.B, N}, opts) : at::empty({0}, opts);
  };
  return {at::empty({z.B, N}, opts), at::empty({z.B, N}, opts.dtype(at::kLong)),
          maps(want_entropy), maps(want_entropy),
          want_probs ? at::empty({z.B, z.C, N}, opts) : at::empty({0}, opts)};
}

}  // namespace uce_mc
