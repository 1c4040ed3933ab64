// Host dispatch of the bitmap SpMM: problem checks, per-device kernel attributes, element type.
// The kernels live in bitmap_f16.cu / bitmap_bf16.cu (one translation unit per type, built in
// parallel).
#include "bitmap_api.cuh"
#include "per_device_once.cuh"

namespace flashsparse {

namespace {
bool valid_type(BitmapElem type) { return type == BitmapElem::kFloat16 || type == BitmapElem::kBFloat16; }

PerDeviceOnce g_prepared;

cudaError_t prepare(BitmapElem type) {
    return g_prepared.run(type == BitmapElem::kBFloat16 ? 1 : 0, [type] {
        return type == BitmapElem::kBFloat16 ? detail::bitmap_prepare_bf16() : detail::bitmap_prepare_f16();
    });
}
}  // namespace

cudaError_t bitmap_spmm(BitmapElem type, const BitmapProblem& pr, cudaStream_t stream) {
    if (!valid_type(type) || pr.m < 1 || pr.k < 1 || pr.n < 1 || pr.x == nullptr || pr.masks == nullptr ||
        pr.tile_offsets == nullptr || pr.y == nullptr || pr.value_chunks < 0 ||
        (pr.value_chunks > 0 && pr.values == nullptr) || (pr.tile_n != 0 && !bmp::valid_tile_n(pr.tile_n)) ||
        reinterpret_cast<uintptr_t>(pr.masks) % 16 != 0 || reinterpret_cast<uintptr_t>(pr.values) % 16 != 0) {
        return cudaErrorInvalidValue;
    }
    const cudaError_t err = prepare(type);
    if (err != cudaSuccess) return err;
    return type == BitmapElem::kBFloat16 ? detail::bitmap_spmm_bf16(pr, stream) : detail::bitmap_spmm_f16(pr, stream);
}

cudaError_t bitmap_max_active_blocks(BitmapElem type, int tile_n, int* blocks_per_sm) {
    if (!valid_type(type) || !bmp::valid_tile_n(tile_n) || blocks_per_sm == nullptr) return cudaErrorInvalidValue;
    const cudaError_t err = prepare(type);
    if (err != cudaSuccess) return err;
    return type == BitmapElem::kBFloat16 ? detail::bitmap_occupancy_bf16(tile_n, blocks_per_sm)
                                         : detail::bitmap_occupancy_f16(tile_n, blocks_per_sm);
}

}  // namespace flashsparse
