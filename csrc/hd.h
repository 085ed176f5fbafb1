// MEDIX_HD: marks the inline math shared by the CPU (.cpp) and CUDA (.cu) implementations.
#pragma once

#ifdef __CUDACC__
#define MEDIX_HD __host__ __device__ __forceinline__
#else
#define MEDIX_HD inline
#endif
