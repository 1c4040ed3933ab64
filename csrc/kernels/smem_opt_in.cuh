// Host helper: opt one kernel instantiation into its dynamic shared memory on a device, at its
// first use there, thread-safely.
//
// Dynamic shared memory above 48 KiB is a per-function attribute that must be set on each
// device before the first launch (setting it on every launch would cost a driver call per
// GEMV). Each instantiation opts in on its own and first checks that its static + dynamic
// shared memory fits the device's per-block opt-in limit (cudaDevAttrMaxSharedMemoryPerBlockOptin:
// 227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86/89/120), so an instantiation that does
// not fit fails alone -- with cudaErrorInvalidConfiguration, remembered per device -- and the
// others still run.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <mutex>

namespace flashsparse {

class SmemOptIn {
   public:
    static constexpr int kMaxDevices = 64;

    // cudaSuccess when `kernel` may launch with `dynamic_bytes` of dynamic shared memory on the
    // current device; cudaErrorInvalidConfiguration when static + dynamic bytes exceed the
    // device's limit; any other runtime error as returned (not remembered, so a later call
    // retries). Never leaves an error in the runtime's last-error state.
    template <class Kernel>
    cudaError_t ensure(Kernel kernel, int dynamic_bytes) {
        int device = 0;
        cudaError_t err = cudaGetDevice(&device);
        if (err != cudaSuccess) return clear(err);
        if (device < 0 || device >= kMaxDevices) return cudaErrorInvalidDevice;
        int state = state_[device].load(std::memory_order_acquire);
        if (state != kUnknown) return state == kReady ? cudaSuccess : cudaErrorInvalidConfiguration;
        std::lock_guard<std::mutex> lock(mutex_);
        state = state_[device].load(std::memory_order_relaxed);
        if (state != kUnknown) return state == kReady ? cudaSuccess : cudaErrorInvalidConfiguration;
        int need = 0, limit = 0;
        err = footprint(kernel, dynamic_bytes, &need, &limit);
        if (err != cudaSuccess) return err;
        if (need > limit) {
            state_[device].store(kTooBig, std::memory_order_release);
            return cudaErrorInvalidConfiguration;
        }
        err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, dynamic_bytes);
        if (err != cudaSuccess) return clear(err);
        state_[device].store(kReady, std::memory_order_release);
        return cudaSuccess;
    }

    // Static + dynamic shared memory bytes of one block of `kernel` (`need`) and the current
    // device's per-block opt-in limit (`limit`).
    template <class Kernel>
    static cudaError_t footprint(Kernel kernel, int dynamic_bytes, int* need, int* limit) {
        int device = 0;
        cudaError_t err = cudaGetDevice(&device);
        if (err != cudaSuccess) return clear(err);
        cudaFuncAttributes attr;
        err = cudaFuncGetAttributes(&attr, kernel);
        if (err != cudaSuccess) return clear(err);
        err = cudaDeviceGetAttribute(limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        if (err != cudaSuccess) return clear(err);
        *need = static_cast<int>(attr.sharedSizeBytes) + dynamic_bytes;
        return cudaSuccess;
    }

   private:
    enum : int { kUnknown = 0, kReady = 1, kTooBig = 2 };
    // A failed runtime call also sets the runtime's last error, which the next unrelated
    // launch check (cudaGetLastError) would report: take it back.
    static cudaError_t clear(cudaError_t err) {
        (void)cudaGetLastError();
        return err;
    }

    std::atomic<int> state_[kMaxDevices] = {};
    std::mutex mutex_;
};

}  // namespace flashsparse
