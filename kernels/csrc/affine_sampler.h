// Per-pixel math of the fused STN sampler, shared by the CUDA kernels (affine_sampler.cu) and the CPU loop
// (affine_sampler.cpp), so both compute exactly what
//   F.grid_sample(x, F.affine_grid(theta, x.shape, align_corners=True), "bilinear", "zeros", align_corners=True)
// computes, without ever materialising the grid. No torch and no CUDA headers: plain C++ that nvcc and g++ both
// compile. `T` is the storage type of x / y (float, double, half, bfloat16: see storage_cast),
// `A` the math type (float, or double for double tensors). Indices within one sample are 32-bit (64-bit integer
// division is slow on the GPU); the binding checks that C * H * W fits, callers offset pointers to the sample.
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define AS_HD __host__ __device__ __forceinline__
#else
#define AS_HD inline
#endif

namespace affine_sampler {

// Block size of the CUDA kernels, and how many pixels each backward thread visits: the theta-gradient partial
// sums are laid out per (sample, block), so the binding sizes that buffer with the same function.
constexpr int kThreads = 256;
constexpr int kPixelsPerThread = 4;

AS_HD int backward_blocks_per_sample(int hw) {
  const int per_block = kThreads * kPixelsPerThread;
  const int blocks = (hw + per_block - 1) / per_block;
  return blocks > 0 ? blocks : 1;
}

// Storage <-> math conversion. The .cu specialises it for CUDA's half types, whose implicit conversions torch's
// extension build switches off (-D__CUDA_NO_HALF_CONVERSIONS__ and friends).
template <typename To, typename From>
AS_HD To storage_cast(From v) { return static_cast<To>(v); }

// Normalised coordinate of pixel i on an axis of `size` pixels, as affine_grid builds it with
// torch.linspace(-1, 1, size) (same two-sided formula, so the same rounding); a size-1 axis sits at 0.
template <typename A>
AS_HD A base_coord(int i, int size) {
  if (size <= 1) return A(0);
  const A step = A(2) / A(size - 1);
  return i < size / 2 ? A(-1) + step * A(i) : A(1) - step * A(size - 1 - i);
}

// Source position in input pixels of the output pixel with normalised coordinates (xn, yn): theta @ (xn, yn, 1),
// then grid_sample's align_corners=True unnormalisation ((g + 1) / 2) * (size - 1).
template <typename A>
AS_HD void source_pixel(const A* t, A xn, A yn, int H, int W, A& ix, A& iy) {
  const A gx = xn * t[0] + yn * t[1] + t[2];
  const A gy = xn * t[3] + yn * t[4] + t[5];
  ix = (gx + A(1)) / A(2) * A(W - 1);
  iy = (gy + A(1)) / A(2) * A(H - 1);
}

// The four taps around a source position: north-west corner (x0, y0), the weights of the west/east columns and
// north/south rows, and which of the taps lie inside the image (zero padding: outside taps read as 0).
template <typename A>
struct Taps {
  int x0, y0;
  A wx0, wx1, wy0, wy1;
  bool in_x0, in_x1, in_y0, in_y1;
};

template <typename A>
AS_HD Taps<A> taps_at(A ix, A iy, int H, int W) {
  Taps<A> k;
  // A position at least two pixels outside (or NaN) touches no tap; clamping it first keeps floor() -> int defined.
  const bool near = ix > A(-2) && ix < A(W + 1) && iy > A(-2) && iy < A(H + 1);
  if (!near) { ix = A(-3); iy = A(-3); }
  const A fx0 = floor(ix), fy0 = floor(iy);
  k.x0 = int(fx0);
  k.y0 = int(fy0);
  // Weights written as grid_sample writes them ((x0 + 1) - ix rather than 1 - (ix - x0)) for the same rounding.
  k.wx0 = fx0 + A(1) - ix;
  k.wx1 = ix - fx0;
  k.wy0 = fy0 + A(1) - iy;
  k.wy1 = iy - fy0;
  k.in_x0 = k.x0 >= 0 && k.x0 < W;
  k.in_x1 = k.x0 + 1 >= 0 && k.x0 + 1 < W;
  k.in_y0 = k.y0 >= 0 && k.y0 < H;
  k.in_y1 = k.y0 + 1 >= 0 && k.y0 + 1 < H;
  return k;
}

// The four tap values of one channel plane (row-major, width W), 0 outside the image.
template <typename A>
struct Corners {
  A v00, v01, v10, v11;  // v<row><column>: 00 = north-west, 01 = north-east, 10 = south-west, 11 = south-east
};

template <typename T, typename A>
AS_HD Corners<A> load_corners(const T* plane, int W, const Taps<A>& k) {
  const T* row0 = plane + k.y0 * W + k.x0;
  const T* row1 = row0 + W;
  Corners<A> c;
  c.v00 = k.in_y0 && k.in_x0 ? storage_cast<A>(row0[0]) : A(0);
  c.v01 = k.in_y0 && k.in_x1 ? storage_cast<A>(row0[1]) : A(0);
  c.v10 = k.in_y1 && k.in_x0 ? storage_cast<A>(row1[0]) : A(0);
  c.v11 = k.in_y1 && k.in_x1 ? storage_cast<A>(row1[1]) : A(0);
  return c;
}

template <typename A>
AS_HD A bilinear(const Corners<A>& c, const Taps<A>& k) {
  return c.v00 * (k.wx0 * k.wy0) + c.v01 * (k.wx1 * k.wy0) + c.v10 * (k.wx0 * k.wy1) + c.v11 * (k.wx1 * k.wy1);
}

// d(sample)/d(ix) and d(sample)/d(iy) of the bilinear interpolation (one-sided at integer positions, like
// grid_sample's backward).
template <typename A>
AS_HD void bilinear_grad(const Corners<A>& c, const Taps<A>& k, A& d_ix, A& d_iy) {
  d_ix = (c.v01 - c.v00) * k.wy0 + (c.v11 - c.v10) * k.wy1;
  d_iy = (c.v10 - c.v00) * k.wx0 + (c.v11 - c.v01) * k.wx1;
}

// y[c, p] for every channel of one output pixel p; x and y point at one sample's (C, H, W) block.
template <typename T, typename A>
AS_HD void forward_pixel(const T* x, T* y, int C, int H, int W, int p, const Taps<A>& k) {
  const int hw = H * W;
  for (int c = 0; c < C; ++c) y[c * hw + p] = storage_cast<T>(bilinear(load_corners(x + c * hw, W, k), k));
}

// Backward of one output pixel p over every channel: returns d(loss)/d(ix), d(loss)/d(iy) through
// (d_ix, d_iy), and when gx is non-null scatters gy * tap weight into the image gradient with `add(ptr, value)`
// (an atomic add on the GPU, where neighbouring pixels share taps; a plain add in the CPU loop).
template <typename T, typename A, typename Add>
AS_HD void backward_pixel(const T* x, const T* gy, A* gx, Add add, int C, int H, int W, int p,
                          const Taps<A>& k, A& d_ix, A& d_iy) {
  const int hw = H * W;
  d_ix = A(0);
  d_iy = A(0);
  for (int c = 0; c < C; ++c) {
    const A g = storage_cast<A>(gy[c * hw + p]);
    A dx, dy;
    bilinear_grad(load_corners(x + c * hw, W, k), k, dx, dy);
    d_ix += g * dx;
    d_iy += g * dy;
    if (gx) {
      A* row0 = gx + c * hw + k.y0 * W + k.x0;
      if (k.in_y0 && k.in_x0) add(row0, g * (k.wx0 * k.wy0));
      if (k.in_y0 && k.in_x1) add(row0 + 1, g * (k.wx1 * k.wy0));
      if (k.in_y1 && k.in_x0) add(row0 + W, g * (k.wx0 * k.wy1));
      if (k.in_y1 && k.in_x1) add(row0 + W + 1, g * (k.wx1 * k.wy1));
    }
  }
}

// Chains d(loss)/d(ix, iy) of one pixel through the unnormalisation and theta @ (xn, yn, 1) into the six
// theta-gradient sums of its sample.
template <typename A, typename S>
AS_HD void accumulate_theta_grad(A d_ix, A d_iy, A xn, A yn, int H, int W, S* acc) {
  const A gx = d_ix * (A(W - 1) / A(2));
  const A gy = d_iy * (A(H - 1) / A(2));
  acc[0] += gx * xn;
  acc[1] += gx * yn;
  acc[2] += gx;
  acc[3] += gy * xn;
  acc[4] += gy * yn;
  acc[5] += gy;
}

}  // namespace affine_sampler
