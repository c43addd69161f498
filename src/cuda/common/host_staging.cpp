// copy_host_to_device on a GPU: host bytes copied to the device without waiting for the stream.
//
// A copy from pageable host memory either waits for the stream (torch's blocking copy does) or
// leaves the driver to stage it as it likes; a copy from pinned memory is queued and returns, but
// the pinned bytes must then stay as they are until the device has read them. So the bytes go
// into a pinned block that the library owns, and an event recorded after the copy says when the
// block may be reused. A decode plan's upload then returns at once while the GPU still runs the
// previous step (bench/NOTES.md, session 70).
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstring>
#include <deque>
#include <mutex>

#include "cuda/common/cuda_check.h"
#include "cuda/common/host_checks.h"
#include "cuda/cuda_backend.h"

namespace fastattn::cuda_memory {
namespace {

/// One pinned block and the event recorded after the copy that last read it.
struct StagingBlock {
  void* host = nullptr;
  std::size_t bytes = 0;
  int device = -1;              // the device of `read` (an event belongs to one device)
  cudaEvent_t read = nullptr;   // made with the block; free until recorded, then once complete
  bool in_use = false;          // between take() and give_back()
};

constexpr std::size_t kMinBlockBytes = std::size_t(1) << 12;
// Blocks the pool keeps at most. Each is busy only until the device runs its copy, so a pool of
// this size covers a host that runs many calls ahead of the GPU; past it, take() waits for a block.
constexpr std::size_t kMaxBlocks = 64;

std::size_t block_size_for(std::size_t bytes) {
  std::size_t size = kMinBlockBytes;
  while (size < bytes) size *= 2;
  return size;
}

/// The library's pinned blocks, shared by every thread and device. Never destroyed: the CUDA
/// runtime may be torn down before static destructors run.
class StagingPool {
 public:
  /// A block of at least `bytes` on `device` that no copy still reads, marked in use. The caller's
  /// current device is `device`.
  StagingBlock& take(std::size_t bytes, int device) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (StagingBlock& b : blocks_)
      if (!b.in_use && b.device == device && b.bytes >= bytes && finished(b)) return claim(b);
    if (blocks_.size() < kMaxBlocks) {
      blocks_.push_back(make_block(bytes, device));
      return claim(blocks_.back());
    }
    // The pool is full of blocks still being read, or of the wrong size or device: wait for the
    // first one no other call holds, and make it fit.
    for (StagingBlock& b : blocks_) {
      if (b.in_use) continue;
      FASTATTN_CUDA_CHECK(cudaEventSynchronize(b.read));
      if (b.device != device || b.bytes < bytes) {
        StagingBlock fitting = make_block(bytes, device);
        release(b);
        b = fitting;
      }
      return claim(b);
    }
    throw Error("fastattn: copy_host_to_device: all " + std::to_string(kMaxBlocks) +
                " staging blocks are held by calls in progress on other threads");
  }

  /// Hands the block back; the copy that reads it was queued on `stream` (nothing was queued when
  /// `queued` is false). If the event cannot be recorded the block stays held: nothing would say
  /// when it is free.
  void give_back(StagingBlock& b, cudaStream_t stream, bool queued) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (queued) FASTATTN_CUDA_CHECK(cudaEventRecord(b.read, stream));
    b.in_use = false;
  }

 private:
  static StagingBlock& claim(StagingBlock& b) {
    b.in_use = true;
    return b;
  }

  static bool finished(const StagingBlock& b) {
    const cudaError_t state = cudaEventQuery(b.read);
    if (state == cudaErrorNotReady) {
      (void)cudaGetLastError();  // cudaErrorNotReady is a state, not an error to report later
      return false;
    }
    FASTATTN_CUDA_CHECK(state);
    return true;
  }

  /// A new block on the current device (`device`); on failure nothing is left allocated.
  static StagingBlock make_block(std::size_t bytes, int device) {
    StagingBlock b;
    b.bytes = block_size_for(bytes);
    b.device = device;
    FASTATTN_CUDA_CHECK(cudaHostAlloc(&b.host, b.bytes, cudaHostAllocPortable));
    const cudaError_t err = cudaEventCreateWithFlags(&b.read, cudaEventDisableTiming);
    if (err != cudaSuccess) {
      (void)cudaFreeHost(b.host);
      cuda_detail::throw_cuda_error(err, "cudaEventCreateWithFlags", __FILE__, __LINE__);
    }
    return b;
  }

  static void release(const StagingBlock& b) {
    FASTATTN_CUDA_CHECK(cudaEventDestroy(b.read));
    FASTATTN_CUDA_CHECK(cudaFreeHost(b.host));
  }

  std::mutex mutex_;
  std::deque<StagingBlock> blocks_;  // a deque: blocks keep their addresses as it grows
};

StagingPool& staging_pool() {
  static StagingPool* pool = new StagingPool();
  return *pool;
}

}  // namespace

void copy_host_to_device(check::ArgChecker& c, const TensorView& src, const TensorView& dst,
                         const ExecConfig& exec) {
  const std::size_t bytes = static_cast<std::size_t>(src.numel()) * dtype_size(src.dtype);
  const auto stream = static_cast<cudaStream_t>(exec.cuda_stream);
  cuda_detail::DeviceGuard guard(c.device().index);
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  FASTATTN_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  if (capture != cudaStreamCaptureStatusNone)
    c.fail_value("exec.cuda_stream", "is being captured into a CUDA graph; a copy of host bytes "
                                     "cannot be captured (each replay would read a staging block "
                                     "reused since): make the copy before or after the capture");
  StagingPool& pool = staging_pool();
  StagingBlock& block = pool.take(bytes, c.device().index);
  try {
    std::memcpy(block.host, src.data, bytes);
    FASTATTN_CUDA_CHECK(cudaMemcpyAsync(dst.data, block.host, bytes, cudaMemcpyHostToDevice, stream));
  } catch (...) {
    pool.give_back(block, stream, /*queued=*/false);
    throw;
  }
  pool.give_back(block, stream, /*queued=*/true);
}

}  // namespace fastattn::cuda_memory
