// far_kernels._C: validation and dispatch only; the math lives in bilstm_cpu.cpp, cuda/*.cu
// and the shared header lstm_cell.h.
#include <torch/extension.h>
#include <ATen/MemoryOverlap.h>

#include <cstring>
#include <vector>

#include "bilstm_cpu.h"
#include "crossbar_cpu.h"
#ifdef FAR_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/bilstm_cuda.h"
#endif

namespace {

// gx [H, B, T, 2, 4n], w_hh [H, 2, 4n, n], hidden [2, H] int64 (CPU) -> n
int64_t check_scan(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& hidden) {
  TORCH_CHECK(gx.dim() == 5 && gx.size(3) == 2 && gx.size(4) % 4 == 0,
              "bilstm_scan: gx must be [H, B, T, 2, 4n], got ", gx.sizes());
  const int64_t H = gx.size(0), n = gx.size(4) / 4;
  TORCH_CHECK(w_hh.dim() == 4 && w_hh.size(0) == H && w_hh.size(1) == 2 && w_hh.size(2) == 4 * n &&
                  w_hh.size(3) == n,
              "bilstm_scan: w_hh must be [H, 2, 4n, n] = [", H, ", 2, ", 4 * n, ", ", n, "], got ", w_hh.sizes());
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == 2 && hidden.size(1) == H,
              "bilstm_scan: hidden_sizes must be [2, H] = [2, ", H, "], got ", hidden.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kLong && hidden.device().is_cpu(),
              "bilstm_scan: hidden_sizes must be an int64 CPU tensor");
  TORCH_CHECK(gx.is_contiguous() && w_hh.is_contiguous() && hidden.is_contiguous(),
              "bilstm_scan: gx, w_hh and hidden_sizes must be contiguous");
  const auto hs = hidden.accessor<int64_t, 2>();
  for (int64_t d = 0; d < 2; ++d)
    for (int64_t h = 0; h < H; ++h)
      TORCH_CHECK(hs[d][h] >= 0 && hs[d][h] <= n, "bilstm_scan: hidden_sizes[", d, ", ", h, "] = ", hs[d][h],
                  " is outside [0, ", n, "]");
  return n;
}

// out (optional) must be [H, B, T, 2, n], gx's dtype and device, contiguous; else it is allocated.
at::Tensor make_out(const at::Tensor& gx, int64_t n, const c10::optional<at::Tensor>& out) {
  const std::vector<int64_t> shape{gx.size(0), gx.size(1), gx.size(2), 2, n};
  if (!out.has_value()) return at::empty(shape, gx.options());
  const at::Tensor& o = *out;
  TORCH_CHECK(o.sizes() == at::IntArrayRef(shape), "bilstm_scan: out must be ", at::IntArrayRef(shape), ", got ", o.sizes());
  TORCH_CHECK(o.scalar_type() == gx.scalar_type() && o.device() == gx.device() && o.is_contiguous(),
              "bilstm_scan: out must be contiguous with gx's dtype and device");
  return o;
}

// The kernels run without the GIL, so another thread may change any tensor meanwhile: hidden sizes (which index
// memory) are copied here and the copy is validated and used; out must share no memory with an input.
std::vector<int64_t> copy_hidden(const at::Tensor& hidden, int64_t H, int64_t n, const char* op) {
  std::vector<int64_t> hs(2 * H);
  if (H > 0) std::memcpy(hs.data(), hidden.data_ptr<int64_t>(), hs.size() * sizeof(int64_t));
  for (int64_t i = 0; i < 2 * H; ++i)
    TORCH_CHECK(hs[i] >= 0 && hs[i] <= n, op, ": hidden_sizes[", i / H, ", ", i % H, "] = ", hs[i],
                " is outside [0, ", n, "]");
  return hs;
}

void check_no_overlap(const at::Tensor& out, std::initializer_list<const at::Tensor*> inputs, const char* op) {
  TORCH_CHECK(!out.defined() || at::has_internal_overlap(out) != at::MemOverlap::Yes, op,
              ": out has elements that share memory");
  for (const auto* t : inputs)
    TORCH_CHECK(at::get_overlap_status(out, *t) == at::MemOverlapStatus::No, op,
                ": out shares memory with an input; pass a separate output tensor");
}

at::Tensor scan_cpu(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& hidden,
                    const c10::optional<at::Tensor>& out_opt) {
  const int64_t n = check_scan(gx, w_hh, hidden);
  TORCH_CHECK(gx.device().is_cpu() && w_hh.device().is_cpu(), "bilstm_scan_cpu: tensors must be on the CPU");
  TORCH_CHECK(gx.scalar_type() == at::kFloat && w_hh.scalar_type() == at::kFloat,
              "bilstm_scan_cpu: gx and w_hh must be float32, got ", gx.scalar_type(), " and ", w_hh.scalar_type());
  const auto hs = copy_hidden(hidden, gx.size(0), n, "bilstm_scan_cpu");
  auto out = make_out(gx, n, out_opt);
  check_no_overlap(out, {&gx, &w_hh, &hidden}, "bilstm_scan_cpu");
  const int threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release nogil;
    far::bilstm_scan_cpu(gx.data_ptr<float>(), w_hh.data_ptr<float>(), hs.data(), out.data_ptr<float>(),
                         gx.size(0), gx.size(1), gx.size(2), n, threads);
  }
  return out;
}

// x [B, T, H*d], w_ih [H, 2, 4n, d], bias [H, 2, 4n], w_hh [H, 2, 4n, n], hidden [2, H]; all fp32 CPU contiguous.
at::Tensor fused_scan_cpu(const at::Tensor& x, const at::Tensor& w_ih, const at::Tensor& bias, const at::Tensor& w_hh,
                          const at::Tensor& hidden, const c10::optional<at::Tensor>& out_opt) {
  TORCH_CHECK(w_ih.dim() == 4 && w_ih.size(1) == 2 && w_ih.size(2) % 4 == 0,
              "bilstm_fused_scan: w_ih must be [H, 2, 4n, d], got ", w_ih.sizes());
  const int64_t H = w_ih.size(0), n = w_ih.size(2) / 4, d = w_ih.size(3);
  TORCH_CHECK(x.dim() == 3 && x.size(2) == H * d, "bilstm_fused_scan: x must be [B, T, H*d] = [B, T, ", H * d,
              "], got ", x.sizes());
  TORCH_CHECK(bias.dim() == 3 && bias.size(0) == H && bias.size(1) == 2 && bias.size(2) == 4 * n,
              "bilstm_fused_scan: bias must be [H, 2, 4n] = [", H, ", 2, ", 4 * n, "], got ", bias.sizes());
  TORCH_CHECK(w_hh.dim() == 4 && w_hh.size(0) == H && w_hh.size(1) == 2 && w_hh.size(2) == 4 * n &&
                  w_hh.size(3) == n,
              "bilstm_fused_scan: w_hh must be [H, 2, 4n, n] = [", H, ", 2, ", 4 * n, ", ", n, "], got ", w_hh.sizes());
  TORCH_CHECK(hidden.dim() == 2 && hidden.size(0) == 2 && hidden.size(1) == H,
              "bilstm_fused_scan: hidden_sizes must be [2, H] = [2, ", H, "], got ", hidden.sizes());
  TORCH_CHECK(hidden.scalar_type() == at::kLong && hidden.device().is_cpu(),
              "bilstm_fused_scan: hidden_sizes must be an int64 CPU tensor");
  for (const auto* t : {&x, &w_ih, &bias, &w_hh}) {
    TORCH_CHECK(t->device().is_cpu(), "bilstm_fused_scan_cpu: tensors must be on the CPU, got ", t->device());
    TORCH_CHECK(t->scalar_type() == at::kFloat, "bilstm_fused_scan_cpu: x, w_ih, bias and w_hh must be float32, got ",
                t->scalar_type());
  }
  TORCH_CHECK(x.is_contiguous() && w_ih.is_contiguous() && bias.is_contiguous() && w_hh.is_contiguous() &&
                  hidden.is_contiguous(),
              "bilstm_fused_scan: x, w_ih, bias, w_hh and hidden_sizes must be contiguous");
  const auto hs = copy_hidden(hidden, H, n, "bilstm_fused_scan");
  const int64_t B = x.size(0), T = x.size(1);
  const std::vector<int64_t> shape{H, B, T, 2, n};
  at::Tensor out;
  if (out_opt.has_value()) {
    out = *out_opt;
    TORCH_CHECK(out.sizes() == at::IntArrayRef(shape), "bilstm_fused_scan: out must be ", at::IntArrayRef(shape),
                ", got ", out.sizes());
    TORCH_CHECK(out.scalar_type() == at::kFloat && out.device().is_cpu() && out.is_contiguous(),
                "bilstm_fused_scan: out must be a contiguous float32 CPU tensor");
  } else {
    out = at::empty(shape, x.options());
  }
  check_no_overlap(out, {&x, &w_ih, &bias, &w_hh, &hidden}, "bilstm_fused_scan_cpu");
  const int threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release nogil;
    far::bilstm_fused_scan_cpu(x.data_ptr<float>(), w_ih.data_ptr<float>(), bias.data_ptr<float>(),
                               w_hh.data_ptr<float>(), hs.data(), out.data_ptr<float>(), H, B, T, d,
                               n, H * d, threads);
  }
  return out;
}

// Crossbar emulator epilogue (csrc/crossbar_cpu.h): p [G, T, J, m, S*N] fp32 partial sums of rows m0 .. m0+m-1 ->
// y [G, M_total, N] fp32 rows m0 ... weights [G, T, J]; steps [G, S] (code 2); s_x, offsets [G, M_total];
// w_scale, bias [G, N]; mults [G, S] (calibrated epilogue). Empty tensors stand for absent offsets / bias.
void crossbar_adc_reduce(const at::Tensor& p, const at::Tensor& weights, const at::Tensor& steps, at::Tensor& y,
                         const at::Tensor& s_x, const at::Tensor& w_scale, const at::Tensor& offsets,
                         const at::Tensor& bias, const at::Tensor& mults, int64_t m0, int64_t code, int64_t epilogue,
                         int64_t cell_bits, double step, double L, double p_max, double sigma, uint64_t key,
                         bool exact_f32) {
  auto is = [](const at::Tensor& t, at::ScalarType dt, at::IntArrayRef shape) {
    return t.scalar_type() == dt && t.is_contiguous() && t.device().is_cpu() && t.sizes() == shape;
  };
  TORCH_CHECK(p.dim() == 5 && p.scalar_type() == at::kFloat && p.is_contiguous() && p.device().is_cpu(),
              "crossbar_adc_reduce: p must be a contiguous float32 CPU tensor [G, T, J, m, S*N], got ", p.sizes());
  TORCH_CHECK(y.dim() == 3 && y.scalar_type() == at::kFloat && y.is_contiguous() && y.device().is_cpu(),
              "crossbar_adc_reduce: y must be a contiguous float32 CPU tensor [G, M, N], got ", y.sizes());
  const int64_t G = p.size(0), T = p.size(1), J = p.size(2), m = p.size(3);
  const int64_t M_total = y.size(1), N = y.size(2);
  TORCH_CHECK(y.size(0) == G && N > 0 && p.size(4) % N == 0 && m0 >= 0 && m0 + m <= M_total,
              "crossbar_adc_reduce: p ", p.sizes(), " does not fit y ", y.sizes(), " at row ", m0);
  const int64_t S = p.size(4) / N;
  TORCH_CHECK(S >= 1, "crossbar_adc_reduce: p holds no weight slice (p.size(4) = ", p.size(4), ")");
  TORCH_CHECK(is(weights, at::kFloat, {G, T, J}), "crossbar_adc_reduce: weights must be float32 [G, T, J]");
  TORCH_CHECK(is(s_x, at::kFloat, {G, M_total}), "crossbar_adc_reduce: s_x must be float32 [G, M]");
  TORCH_CHECK(is(w_scale, at::kFloat, {G, N}), "crossbar_adc_reduce: w_scale must be float32 [G, N]");
  TORCH_CHECK(offsets.numel() == 0 || is(offsets, at::kLong, {G, M_total}),
              "crossbar_adc_reduce: offsets must be empty or int64 [G, M]");
  TORCH_CHECK(bias.numel() == 0 || is(bias, at::kFloat, {G, N}), "crossbar_adc_reduce: bias must be empty or float32 [G, N]");
  TORCH_CHECK(code >= 0 && code <= 2, "crossbar_adc_reduce: code must be 0, 1 or 2, got ", code);
  TORCH_CHECK(epilogue >= 0 && epilogue <= 2, "crossbar_adc_reduce: epilogue must be 0, 1 or 2, got ", epilogue);
  TORCH_CHECK(code != 2 || is(steps, at::kFloat, {G, S}), "crossbar_adc_reduce: steps must be float32 [G, S]");
  TORCH_CHECK(epilogue != 2 || is(mults, at::kFloat, {G, S}), "crossbar_adc_reduce: mults must be float32 [G, S]");
  TORCH_CHECK(sigma == 0.0 || code == 2, "crossbar_adc_reduce: read noise needs code 2 (divide)");
  TORCH_CHECK(cell_bits >= 1 && cell_bits * (S - 1) < 62, "crossbar_adc_reduce: cell_bits out of range");
  far::CrossbarAdcArgs a{};
  a.p = p.data_ptr<float>();
  a.weights = weights.data_ptr<float>();
  a.steps = code == 2 ? steps.data_ptr<float>() : nullptr;
  a.s_x = s_x.data_ptr<float>();
  a.w_scale = w_scale.data_ptr<float>();
  a.offsets = offsets.numel() ? offsets.data_ptr<int64_t>() : nullptr;
  a.bias = bias.numel() ? bias.data_ptr<float>() : nullptr;
  a.mults = epilogue == 2 ? mults.data_ptr<float>() : nullptr;
  a.y = y.data_ptr<float>();
  a.epilogue = static_cast<int>(epilogue);
  a.cell_bits = static_cast<int>(cell_bits);
  a.step = static_cast<float>(step);
  a.G = G; a.T = T; a.J = J; a.M = m; a.S = S; a.N = N;
  a.m0 = m0; a.M_total = M_total;
  a.code = static_cast<int>(code);
  a.L = static_cast<float>(L); a.p_max = static_cast<float>(p_max); a.sigma = static_cast<float>(sigma);
  a.key = key; a.exact_f32 = exact_f32;
  const int threads = at::get_num_threads();
  {
    pybind11::gil_scoped_release nogil;
    far::crossbar_adc_reduce_cpu(a, threads);
  }
}

#ifdef FAR_WITH_CUDA
// path: 0 auto, 1 fma, 2 mma (far::ScanPath); fast_tanh: tanh.approx activations.
at::Tensor scan_cuda(const at::Tensor& gx, const at::Tensor& w_hh, const at::Tensor& hidden,
                     const c10::optional<at::Tensor>& out_opt, int64_t path, bool fast_tanh) {
  const int64_t n = check_scan(gx, w_hh, hidden);
  TORCH_CHECK(gx.is_cuda() && w_hh.is_cuda() && gx.device() == w_hh.device(),
              "bilstm_scan_cuda: gx and w_hh must be on the same CUDA device");
  TORCH_CHECK(w_hh.scalar_type() == at::kFloat, "bilstm_scan_cuda: w_hh must be float32");
  TORCH_CHECK(path >= 0 && path <= 2, "bilstm_scan_cuda: path must be 0 (auto), 1 (fma) or 2 (mma), got ", path);
  TORCH_CHECK(gx.size(0) <= far::kMaxHeads, "bilstm_scan_cuda: at most ", far::kMaxHeads, " heads, got ", gx.size(0));
  int code;
  switch (gx.scalar_type()) {
    case at::kFloat: code = far::kF32; break;
    case at::kHalf: code = far::kF16; break;
    case at::kBFloat16: code = far::kBF16; break;
    default: TORCH_CHECK(false, "bilstm_scan_cuda: gx must be float32, float16 or bfloat16, got ", gx.scalar_type());
  }
  const c10::cuda::CUDAGuard guard(gx.device());
  auto out = make_out(gx, n, out_opt);
  check_no_overlap(out, {&gx, &w_hh}, "bilstm_scan_cuda");
  // hidden stays on the host: the launcher passes it to the kernel by value (no copy, no sync)
  const char* err = far::bilstm_scan_cuda(code, gx.data_ptr(), w_hh.data_ptr<float>(), hidden.data_ptr<int64_t>(),
                                          out.data_ptr(), gx.size(0), gx.size(1), gx.size(2), n,
                                          static_cast<int>(path), fast_tanh, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == nullptr, "bilstm_scan_cuda: ", err ? err : "");
  return out;
}
#endif

bool has_cuda() {
#ifdef FAR_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "FAR engine C++/CUDA kernels";
  m.def("has_cuda", &has_cuda, "True when the CUDA kernels were compiled in");
  m.def("bilstm_scan_cpu", &scan_cpu, "multi-head BiLSTM scan (CPU, fp32)", pybind11::arg("gx"),
        pybind11::arg("w_hh"), pybind11::arg("hidden_sizes"), pybind11::arg("out") = pybind11::none());
  m.def("bilstm_fused_scan_cpu", &fused_scan_cpu, "multi-head BiLSTM scan with the input product fused (CPU, fp32)",
        pybind11::arg("x"), pybind11::arg("w_ih"), pybind11::arg("bias"), pybind11::arg("w_hh"),
        pybind11::arg("hidden_sizes"), pybind11::arg("out") = pybind11::none());
  m.def("crossbar_adc_reduce", &crossbar_adc_reduce,
        "crossbar emulator epilogue: read noise, ADC codes, shift-and-add, output scaling (CPU)",
        pybind11::arg("p"), pybind11::arg("weights"), pybind11::arg("steps"), pybind11::arg("y"), pybind11::arg("s_x"),
        pybind11::arg("w_scale"), pybind11::arg("offsets"), pybind11::arg("bias"), pybind11::arg("mults"),
        pybind11::arg("m0"), pybind11::arg("code"), pybind11::arg("epilogue"), pybind11::arg("cell_bits"),
        pybind11::arg("step"), pybind11::arg("L"), pybind11::arg("p_max"), pybind11::arg("sigma"), pybind11::arg("key"),
        pybind11::arg("exact_f32"));
#ifdef FAR_WITH_CUDA
  m.def("bilstm_scan_cuda", &scan_cuda, "multi-head BiLSTM scan (CUDA)", pybind11::arg("gx"),
        pybind11::arg("w_hh"), pybind11::arg("hidden_sizes"), pybind11::arg("out") = pybind11::none(),
        pybind11::arg("path") = 0, pybind11::arg("fast_tanh") = false);
#endif
}
