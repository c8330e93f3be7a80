// CUDA kernels of the fused STN sampler and their launchers, on raw pointers: no torch header, so nvcc compiles
// this file in seconds (tests/test_sampler.py compiles it for sm_80 and sm_90 even on a machine without a GPU).
// The binding (affine_sampler.cpp) allocates every buffer and passes the current stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "affine_sampler.h"

namespace affine_sampler {

template <>
__host__ __device__ __forceinline__ float storage_cast<float, __half>(__half v) { return __half2float(v); }
template <>
__host__ __device__ __forceinline__ __half storage_cast<__half, float>(float v) { return __float2half_rn(v); }
template <>
__host__ __device__ __forceinline__ float storage_cast<float, __nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__host__ __device__ __forceinline__ __nv_bfloat16 storage_cast<__nv_bfloat16, float>(float v) {
  return __float2bfloat16_rn(v);
}

namespace {

struct AtomicAdd {
  template <typename A>
  __device__ void operator()(A* p, A v) const { atomicAdd(p, v); }
};

// One thread per output pixel (all channels): source position from theta in registers, four taps, C outputs.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const T* __restrict__ x, const A* __restrict__ theta, T* __restrict__ y, int C, int H, int W,
               int blocks_per_sample) {
  const int n = blockIdx.x / blocks_per_sample;
  const int p = (blockIdx.x - n * blocks_per_sample) * kThreads + threadIdx.x;
  if (p >= H * W) return;
  const int i = p / W, j = p - i * W;
  A t[6];
  for (int q = 0; q < 6; ++q) t[q] = theta[n * 6 + q];
  A ix, iy;
  source_pixel(t, base_coord<A>(j, W), base_coord<A>(i, H), H, W, ix, iy);
  const int64_t sample = int64_t(n) * C * H * W;
  forward_pixel(x + sample, y + sample, C, H, W, p, taps_at(ix, iy, H, W));
}

// Sums six values over the block in a fixed order (shuffles, then the warps' results in warp order): the
// theta gradient comes out bit-identical on every run.
template <typename A>
__device__ void block_sum6(A (&v)[6]) {
  __shared__ A warp_sums[kThreads / 32][6];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int q = 0; q < 6; ++q)
    for (int off = 16; off > 0; off /= 2) v[q] += __shfl_down_sync(0xffffffffu, v[q], off);
  if (lane == 0)
    for (int q = 0; q < 6; ++q) warp_sums[warp][q] = v[q];
  __syncthreads();
  if (warp == 0) {
    for (int q = 0; q < 6; ++q) {
      v[q] = lane < kThreads / 32 ? warp_sums[lane][q] : A(0);
      for (int off = 16; off > 0; off /= 2) v[q] += __shfl_down_sync(0xffffffffu, v[q], off);
    }
  }
}

// Backward: blocks_per_sample blocks per sample, each thread strides over that sample's pixels; every block
// writes its six theta-gradient partial sums (no float atomics), theta_grad_kernel adds them up. The image
// gradient is scattered with atomics only when gx is non-null.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const T* __restrict__ x, const T* __restrict__ gy, const A* __restrict__ theta, A* __restrict__ gx,
                A* __restrict__ partials, int C, int H, int W, int blocks_per_sample) {
  const int hw = H * W;
  const int n = blockIdx.x / blocks_per_sample, b = blockIdx.x - n * blocks_per_sample;
  A t[6];
  for (int q = 0; q < 6; ++q) t[q] = theta[n * 6 + q];
  const int64_t sample = int64_t(n) * C * hw;
  A* gxs = gx ? gx + sample : nullptr;
  A acc[6] = {A(0), A(0), A(0), A(0), A(0), A(0)};
  for (int p = b * kThreads + threadIdx.x; p < hw; p += blocks_per_sample * kThreads) {
    const int i = p / W, j = p - i * W;
    const A xn = base_coord<A>(j, W), yn = base_coord<A>(i, H);
    A ix, iy;
    source_pixel(t, xn, yn, H, W, ix, iy);
    A d_ix, d_iy;
    backward_pixel(x + sample, gy + sample, gxs, AtomicAdd{}, C, H, W, p, taps_at(ix, iy, H, W), d_ix, d_iy);
    accumulate_theta_grad(d_ix, d_iy, xn, yn, H, W, acc);
  }
  block_sum6(acc);
  if (threadIdx.x == 0)
    for (int q = 0; q < 6; ++q) partials[int64_t(blockIdx.x) * 6 + q] = acc[q];
}

// Second pass: one thread per theta entry adds its sample's block partials in block order.
template <typename A>
__global__ void theta_grad_kernel(const A* __restrict__ partials, A* __restrict__ theta_grad, int N,
                                  int blocks_per_sample) {
  const int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= int64_t(N) * 6) return;
  const int64_t n = idx / 6, q = idx - n * 6;
  A sum = A(0);
  for (int b = 0; b < blocks_per_sample; ++b) sum += partials[(n * blocks_per_sample + b) * 6 + q];
  theta_grad[idx] = sum;
}

int64_t blocks_for(int64_t items, int64_t per_block) { return (items + per_block - 1) / per_block; }

template <typename T, typename A>
cudaError_t forward(const void* x, const void* theta, void* y, int N, int C, int H, int W, cudaStream_t stream) {
  const int bps = int(blocks_for(H * W, kThreads));
  forward_kernel<T, A><<<N * bps, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const A*>(theta),
                                                         static_cast<T*>(y), C, H, W, bps);
  return cudaGetLastError();
}

template <typename T, typename A>
cudaError_t backward(const void* x, const void* gy, const void* theta, void* gx, void* partials, void* theta_grad,
                     int N, int C, int H, int W, cudaStream_t stream) {
  const int bps = backward_blocks_per_sample(H * W);
  backward_kernel<T, A><<<N * bps, kThreads, 0, stream>>>(
      static_cast<const T*>(x), static_cast<const T*>(gy), static_cast<const A*>(theta), static_cast<A*>(gx),
      static_cast<A*>(partials), C, H, W, bps);
  theta_grad_kernel<A><<<blocks_for(int64_t(N) * 6, kThreads), kThreads, 0, stream>>>(
      static_cast<const A*>(partials), static_cast<A*>(theta_grad), N, bps);
  return cudaGetLastError();
}

}  // namespace

// dtype codes shared with the binding: 0 float32, 1 float64, 2 float16, 3 bfloat16 (theta, partials and the
// gradients are float64 for float64 x, float32 otherwise). Both return nullptr or the CUDA error message.
// The caller guarantees N, C, H, W > 0, C * H * W and N * H * W within int, contiguous buffers, and the
// device already current.
const char* affine_sample_forward_cuda(int dtype, const void* x, const void* theta, void* y, int N, int C, int H,
                                       int W, void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case 0: err = forward<float, float>(x, theta, y, N, C, H, W, s); break;
    case 1: err = forward<double, double>(x, theta, y, N, C, H, W, s); break;
    case 2: err = forward<__half, float>(x, theta, y, N, C, H, W, s); break;
    case 3: err = forward<__nv_bfloat16, float>(x, theta, y, N, C, H, W, s); break;
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// gx (may be null: no image gradient) is zero-filled by the caller; partials holds
// N * backward_blocks_per_sample(H * W) * 6 values.
const char* affine_sample_backward_cuda(int dtype, const void* x, const void* gy, const void* theta, void* gx,
                                        void* partials, void* theta_grad, int N, int C, int H, int W,
                                        void* stream) {
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaErrorInvalidValue;
  switch (dtype) {
    case 0: err = backward<float, float>(x, gy, theta, gx, partials, theta_grad, N, C, H, W, s); break;
    case 1: err = backward<double, double>(x, gy, theta, gx, partials, theta_grad, N, C, H, W, s); break;
    case 2: err = backward<__half, float>(x, gy, theta, gx, partials, theta_grad, N, C, H, W, s); break;
    case 3: err = backward<__nv_bfloat16, float>(x, gy, theta, gx, partials, theta_grad, N, C, H, W, s); break;
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace affine_sampler
