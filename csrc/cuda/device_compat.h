// Kernel launch and dynamic shared memory, spelled as macros so that the
// kernels also build as host C++ against the CUDA emulation in
// tests/cuda_host/ (its shim defines both before this header is read; under
// nvcc they are the CUDA syntax).
#pragma once

#ifndef UCE_LAUNCH
// UCE_LAUNCH(grid, block, smem_bytes, stream, kernel)(args...). The kernel is
// last and variadic because its template argument list contains commas.
#define UCE_LAUNCH(grid, block, smem, stream, ...) \
  __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#endif

#ifndef UCE_DYNAMIC_SHARED
// `name`: the block's dynamic shared memory as an array of T.
#define UCE_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif
