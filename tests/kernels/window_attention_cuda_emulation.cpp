// Host emulation of csrc/window_attention_cuda.cu, for tests/kernels/test_window_attention_cuda.py:
// the CUDA source compiled as C++ (EFFNN_CUDA_EMULATE) and run on CPU tensors, one OS thread per
// CUDA thread, std::barrier for __syncthreads, the blocks of a launch one after another, shared
// memory filled with garbage before each block. Registers the two ops as effnn_cuda_emu::*.
// It checks the kernels' index math, synchronisation and numerics where no GPU is available; it
// says nothing about speed, occupancy or the CUDA toolchain.
#include <torch/extension.h>

#include <algorithm>
#include <barrier>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
thread_local dim3 threadIdx, blockIdx, blockDim;
thread_local std::barrier<>* emu_barrier;
thread_local unsigned char* emu_smem;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
#define __global__
#define EFFNN_HD inline
#define EFFNN_D inline
#define EFFNN_CUDA_EMULATE
inline unsigned char* block_smem() { return emu_smem; }
inline int float_bits(float x) {
  int b;
  std::memcpy(&b, &x, 4);
  return b;
}
inline long long double_bits(double x) {
  long long b;
  std::memcpy(&b, &x, 8);
  return b;
}

namespace {
constexpr c10::DeviceType kDevice = c10::DeviceType::CPU;
size_t max_smem() { return 227 * 1024; }  // an H100/H200's opt-in limit: the same tile sizes
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, int threads, size_t smem, Args&&... args) {
  TORCH_CHECK(smem <= max_smem(), "emulated launch: ", smem, " bytes of shared memory");
  std::vector<unsigned char> buf(smem + 16);
  unsigned char* base =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(buf.data()) + 15) & ~uintptr_t(15));
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::fill(buf.begin(), buf.end(), 0xCD);  // reads of shared memory never written show up
        std::barrier<> bar(threads);
        std::vector<std::thread> block;
        for (int t = 0; t < threads; ++t) {
          block.emplace_back([&, t] {
            threadIdx = dim3(t);
            blockIdx = dim3(bx, by, bz);
            blockDim = dim3(threads);
            emu_barrier = &bar;
            emu_smem = base;
            kernel(args...);
          });
        }
        for (std::thread& th : block) th.join();
      }
    }
  }
}
}  // namespace

#include "window_attention_cuda.cu"

TORCH_LIBRARY(effnn_cuda_emu, m) {
  m.def("window_attention_forward", &window_attention_forward);
  m.def("window_attention_backward", &window_attention_backward);
}
