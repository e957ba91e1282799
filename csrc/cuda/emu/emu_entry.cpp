// The CUDA scan kernels (../bilstm_cuda.cu), host side included, built for the CPU emulation in cuda_emu.h.
// Build: g++ -std=c++20 -O2 -fno-strict-aliasing -fvisibility=hidden -shared -fPIC -I<cuda>/include emu_entry.cpp
// (far_kernels/cuda_emu.py does).
#define FAR_CUDA_EMU 1
#include "../bilstm_cuda.cu"

#include <sstream>

extern "C" {

// far::bilstm_scan_cuda (same arguments and contract) on an emulated device of `sms` SMs, each holding
// `blocks_per_sm` blocks of any kernel, with `optin_smem` bytes of opt-in shared memory per block; fibers and
// blocks run in a random order per round when `schedule_seed` != 0; tanh.approx.f32 (fast tanh) is std::tanh times
// (1 + tanh_bias * r), r by `tanh_bias_mode` (cuda_emu.h Config). Returns nullptr or the error string.
__attribute__((visibility("default"))) const char* far_emu_bilstm_scan(int dtype, const void* gx, const float* w_hh,
                                                                const int64_t* hidden, void* out,
                                                                int64_t H, int64_t B, int64_t T, int64_t n, int path,
                                                                int fast_tanh, int sms, int blocks_per_sm,
                                                                int optin_smem, unsigned schedule_seed,
                                                                float tanh_bias, int tanh_bias_mode) {
  far_emu::State& s = far_emu::st();
  s.cfg = far_emu::Config{sms, blocks_per_sm, optin_smem, schedule_seed, tanh_bias, tanh_bias_mode};
  s.device = -1;
  for (size_t i = 0; i < s.devices.size(); ++i) {
    const far_emu::Config& d = s.devices[i];
    if (d.sms == sms && d.blocks_per_sm == blocks_per_sm && d.optin_smem == optin_smem) s.device = static_cast<int>(i);
  }
  if (s.device < 0) {
    s.devices.push_back(s.cfg);
    s.device = static_cast<int>(s.devices.size()) - 1;
  }
  s.launches.clear();
  s.last = cudaSuccess;
  s.message.clear();
  return far::bilstm_scan_cuda(dtype, gx, w_hh, hidden, out, H, B, T, n, path, fast_tanh != 0, nullptr);
}

// The launches of the last far_emu_bilstm_scan call, one per line: kernel \t grid \t block \t shmem.
__attribute__((visibility("default"))) const char* far_emu_launches() {
  static std::string text;
  std::ostringstream os;
  for (const far_emu::Launch& l : far_emu::st().launches)
    os << l.kernel << '\t' << l.grid << '\t' << l.block << '\t' << l.shmem << '\n';
  text = os.str();
  return text.c_str();
}

}  // extern "C"
