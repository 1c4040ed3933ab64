// Host helper: run a setup step once per (element type, device), thread-safely. Dynamic shared
// memory above 48 KiB is a per-function attribute that must be opted into on each device before
// the first launch there; setting it on every launch would cost a driver call per GEMV.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <mutex>

namespace flashsparse {

class PerDeviceOnce {
   public:
    static constexpr int kMaxDevices = 64;
    static constexpr int kTypes = 2;

    template <class Setup>
    cudaError_t run(int type, Setup&& setup) {
        int device = 0;
        cudaError_t err = cudaGetDevice(&device);
        if (err != cudaSuccess) return err;
        if (device < 0 || device >= kMaxDevices || type < 0 || type >= kTypes) return cudaErrorInvalidDevice;
        if (done_[type][device].load(std::memory_order_acquire)) return cudaSuccess;
        std::lock_guard<std::mutex> lock(mutex_);
        if (done_[type][device].load(std::memory_order_relaxed)) return cudaSuccess;
        err = setup();
        if (err == cudaSuccess) done_[type][device].store(true, std::memory_order_release);
        return err;
    }

   private:
    std::atomic<bool> done_[kTypes][kMaxDevices] = {};
    std::mutex mutex_;
};

}  // namespace flashsparse
