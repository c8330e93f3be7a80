// Torch binding of the fused STN sampler: ops torch.ops.emonext_sampler.forward / .backward (the public op with
// autograd and its fake implementation is kernels/sampler.py's emonext::affine_sample, which calls these).
// CPU tensors run a loop over the math of affine_sampler.h; CUDA tensors the kernels of affine_sampler.cu, which
// are compiled in only when AFFINE_SAMPLER_WITH_CUDA is defined (kernels/sampler.py defines it on a CUDA torch).
// Light headers on purpose (no torch/extension.h, no pybind): this file is compiled on every fresh CI run.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <torch/library.h>

#include <tuple>

#include "affine_sampler.h"

#ifdef AFFINE_SAMPLER_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace affine_sampler {
const char* affine_sample_forward_cuda(int dtype, const void* x, const void* theta, void* y, int N, int C, int H,
                                       int W, void* stream);
const char* affine_sample_backward_cuda(int dtype, const void* x, const void* gy, const void* theta, void* gx,
                                        void* partials, void* theta_grad, int N, int C, int H, int W, void* stream);
}  // namespace affine_sampler
#endif

namespace affine_sampler {
namespace {

struct PlainAdd {
  template <typename A>
  void operator()(A* p, A v) const { *p += v; }
};

// Samples are independent (each writes its own output and image-gradient block, and sums its own theta
// gradient in pixel order), so the loop is parallel over the batch and still deterministic.
template <typename T, typename A>
void forward_cpu(const T* x, const A* theta, T* y, int N, int C, int H, int W) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const A* t = theta + n * 6;
      for (int i = 0; i < H; ++i)
        for (int j = 0; j < W; ++j) {
          A ix, iy;
          source_pixel(t, base_coord<A>(j, W), base_coord<A>(i, H), H, W, ix, iy);
          forward_pixel(x + n * C * H * W, y + n * C * H * W, C, H, W, i * W + j, taps_at(ix, iy, H, W));
        }
    }
  });
}

template <typename T, typename A>
void backward_cpu(const T* x, const T* gy, const A* theta, A* gx, A* theta_grad, int N, int C, int H, int W) {
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const A* t = theta + n * 6;
      const int64_t off = n * C * H * W;
      double acc[6] = {0, 0, 0, 0, 0, 0};  // a whole image's sum: double keeps it as exact as the GPU's tree
      for (int i = 0; i < H; ++i)
        for (int j = 0; j < W; ++j) {
          const A xn = base_coord<A>(j, W), yn = base_coord<A>(i, H);
          A ix, iy, d_ix, d_iy;
          source_pixel(t, xn, yn, H, W, ix, iy);
          backward_pixel(x + off, gy + off, gx ? gx + off : nullptr, PlainAdd{}, C, H, W, i * W + j,
                         taps_at(ix, iy, H, W), d_ix, d_iy);
          accumulate_theta_grad(d_ix, d_iy, xn, yn, H, W, acc);
        }
      for (int q = 0; q < 6; ++q) theta_grad[n * 6 + q] = A(acc[q]);
    }
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& theta) {
  TORCH_CHECK(x.dim() == 4, "affine_sample: x must be (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(theta.dim() == 3 && theta.size(0) == x.size(0) && theta.size(1) == 2 && theta.size(2) == 3,
              "affine_sample: theta must be (N, 2, 3) with N = x.size(0), got theta ", theta.sizes(), " for x ",
              x.sizes());
  TORCH_CHECK(x.device() == theta.device(), "affine_sample: x on ", x.device(), " but theta on ", theta.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "affine_sample: x must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK(at::isFloatingType(theta.scalar_type()), "affine_sample: theta must be floating point, got ",
              theta.scalar_type());
  // The kernels index within a sample, and count pixels (hence blocks), in 32-bit integers.
  const int64_t hw = x.size(2) * x.size(3);
  TORCH_CHECK(x.size(1) * hw <= INT32_MAX && x.size(0) * hw <= INT32_MAX, "affine_sample: x ", x.sizes(),
              " is too large for 32-bit indexing");
}

// Whether x goes to the CUDA kernels (false: the CPU loop); refuses devices this build has no kernel for.
bool on_cuda(const at::Tensor& x) {
#ifdef AFFINE_SAMPLER_WITH_CUDA
  if (x.is_cuda()) return true;
#endif
  TORCH_CHECK(x.is_cpu(), "affine_sample: this build of the extension has no kernel for ", x.device());
  return false;
}

at::ScalarType math_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

#ifdef AFFINE_SAMPLER_WITH_CUDA
int cuda_dtype_code(at::ScalarType dt) {
  switch (dt) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kHalf: return 2;
    default: return 3;  // bfloat16; check_inputs admits nothing else
  }
}

void* current_stream(const at::Tensor& x) { return c10::cuda::getCurrentCUDAStream(x.device().index()).stream(); }
#endif

// y = grid_sample(x, affine_grid(theta)) with bilinear taps, zero padding, align_corners=True.
at::Tensor forward(const at::Tensor& x_in, const at::Tensor& theta_in) {
  check_inputs(x_in, theta_in);
  const at::Tensor x = x_in.contiguous();
  const at::Tensor theta = theta_in.to(math_type(x)).contiguous();
  at::Tensor y = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int N = int(x.size(0)), C = int(x.size(1)), H = int(x.size(2)), W = int(x.size(3));
  if (y.numel() == 0) return y;
  if (on_cuda(x)) {
#ifdef AFFINE_SAMPLER_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    const char* err = affine_sample_forward_cuda(cuda_dtype_code(x.scalar_type()), x.data_ptr(), theta.data_ptr(),
                                                 y.data_ptr(), N, C, H, W, current_stream(x));
    TORCH_CHECK(err == nullptr, "affine_sample forward kernel: ", err);
#endif
  } else {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_sample_forward", [&] {
      using A = at::opmath_type<scalar_t>;
      forward_cpu(x.const_data_ptr<scalar_t>(), theta.const_data_ptr<A>(), y.mutable_data_ptr<scalar_t>(), N, C, H,
                  W);
    });
  }
  return y;
}

// (d loss/d theta in theta's dtype, d loss/d x in x's dtype or an empty tensor when x_grad is false: then no
// image-gradient work is done at all).
std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& grad_y_in, const at::Tensor& x_in,
                                            const at::Tensor& theta_in, bool x_grad) {
  check_inputs(x_in, theta_in);
  TORCH_CHECK(grad_y_in.sizes() == x_in.sizes() && grad_y_in.device() == x_in.device(),
              "affine_sample backward: grad_y ", grad_y_in.sizes(), " does not match x ", x_in.sizes());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor grad_y = grad_y_in.to(x.scalar_type()).contiguous();
  const at::Tensor theta = theta_in.to(math_type(x)).contiguous();
  const int N = int(x.size(0)), C = int(x.size(1)), H = int(x.size(2)), W = int(x.size(3));
  at::Tensor theta_grad = at::zeros_like(theta);
  at::Tensor x_grad_acc = x_grad ? at::zeros(x.sizes(), x.options().dtype(math_type(x))) : at::Tensor();
  void* gx = x_grad ? x_grad_acc.data_ptr() : nullptr;
  if (x.numel() > 0 && on_cuda(x)) {
#ifdef AFFINE_SAMPLER_WITH_CUDA
    const c10::cuda::CUDAGuard guard(x.device());
    at::Tensor partials = at::empty({N * backward_blocks_per_sample(H * W) * 6}, theta.options());
    const char* err = affine_sample_backward_cuda(cuda_dtype_code(x.scalar_type()), x.data_ptr(), grad_y.data_ptr(),
                                                  theta.data_ptr(), gx, partials.data_ptr(), theta_grad.data_ptr(), N,
                                                  C, H, W, current_stream(x));
    TORCH_CHECK(err == nullptr, "affine_sample backward kernel: ", err);
#endif
  } else if (x.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "affine_sample_backward", [&] {
      using A = at::opmath_type<scalar_t>;
      backward_cpu(x.const_data_ptr<scalar_t>(), grad_y.const_data_ptr<scalar_t>(), theta.const_data_ptr<A>(),
                   static_cast<A*>(gx), theta_grad.mutable_data_ptr<A>(), N, C, H, W);
    });
  }
  return {theta_grad.to(theta_in.scalar_type()),
          x_grad ? x_grad_acc.to(x.scalar_type()) : at::empty({0}, x.options())};
}

}  // namespace
}  // namespace affine_sampler

TORCH_LIBRARY(emonext_sampler, m) {
  m.def("forward(Tensor x, Tensor theta) -> Tensor", &affine_sampler::forward);
  m.def("backward(Tensor grad_y, Tensor x, Tensor theta, bool x_grad) -> (Tensor, Tensor)", &affine_sampler::backward);
}
