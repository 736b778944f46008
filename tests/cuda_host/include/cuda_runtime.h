// Host build of the CUDA kernels: every CUDA header is the emulation.
#pragma once
#include "cuda_host.h"
