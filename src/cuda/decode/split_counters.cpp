// The library-owned barrier words of the grid merge (split_counters.h says why and how they are
// shared).
#include "cuda/decode/split_counters.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <thread>
#include <tuple>
#include <vector>

namespace fastattn::cuda_decode {
namespace {

constexpr std::size_t kChunkBytes = std::size_t(1) << 20;  // counters are carved from 1 MB chunks
constexpr std::size_t kBlockAlign = 256;
constexpr std::size_t kMinStreamCounters = 4096;  // a stream's first block: 16 KB

/// Lets this thread make calls that stream capture (in its global mode) would refuse, e.g.
/// cudaMalloc while another stream of the thread captures; restores the mode on exit.
class RelaxedCaptureMode {
 public:
  RelaxedCaptureMode() { (void)cudaThreadExchangeStreamCaptureMode(&mode_); }
  ~RelaxedCaptureMode() { (void)cudaThreadExchangeStreamCaptureMode(&mode_); }
  RelaxedCaptureMode(const RelaxedCaptureMode&) = delete;
  RelaxedCaptureMode& operator=(const RelaxedCaptureMode&) = delete;

 private:
  cudaStreamCaptureMode mode_ = cudaStreamCaptureModeRelaxed;
};

/// Zeroed device memory of one device, handed out in blocks and never returned.
struct Arena {
  std::vector<void*> chunks;
  char* next = nullptr;
  std::size_t left = 0;
  cudaStream_t zero_stream = nullptr;  ///< a stream no capture ever holds, for the chunks' memsets

  /// `bytes` zeroed bytes (a multiple of kBlockAlign), or nullptr.
  char* carve(std::size_t bytes) {
    if (bytes > left) {
      RelaxedCaptureMode relaxed;
      const std::size_t size = std::max(kChunkBytes, bytes);
      void* chunk = nullptr;
      if (cudaMalloc(&chunk, size) != cudaSuccess) return nullptr;
      chunks.push_back(chunk);
      // Zeroed on the arena's own stream and waited for here, so the memset is not captured into
      // the caller's graph (it must run now, once) and the counters are zero before any kernel.
      if ((!zero_stream && cudaStreamCreateWithFlags(&zero_stream, cudaStreamNonBlocking) != cudaSuccess) ||
          cudaMemsetAsync(chunk, 0, size, zero_stream) != cudaSuccess ||
          cudaStreamSynchronize(zero_stream) != cudaSuccess)
        return nullptr;  // the chunk stays listed (never handed out)
      next = static_cast<char*>(chunk);
      left = size;
    }
    char* block = next;
    next += bytes;
    left -= bytes;
    return block;
  }
};

/// A stream's block of counters (outside capture).
struct StreamBlock {
  std::uint32_t* counters = nullptr;
  std::size_t count = 0;
};

struct Pool {
  std::mutex mutex;
  std::map<int, Arena> arenas;
  /// (device, stream, thread): the thread only for cudaStreamPerThread, one stream per thread.
  std::map<std::tuple<int, cudaStream_t, std::thread::id>, StreamBlock> streams;
};

Pool& pool() {
  static Pool* p = new Pool;  // never destroyed: calls may come from other static destructors
  return *p;
}

std::size_t block_bytes(std::size_t count) {
  return (count * sizeof(std::uint32_t) + kBlockAlign - 1) / kBlockAlign * kBlockAlign;
}

}  // namespace

std::uint32_t* split_counters(int device, cudaStream_t stream, std::size_t count) {
  if (count == 0) return nullptr;
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &status) != cudaSuccess) {
    (void)cudaGetLastError();  // e.g. the legacy stream while a blocking stream captures
    return nullptr;
  }
  Pool& p = pool();
  std::lock_guard<std::mutex> lock(p.mutex);
  Arena& arena = p.arenas[device];
  std::uint32_t* counters = nullptr;
  if (status == cudaStreamCaptureStatusActive) {
    counters = reinterpret_cast<std::uint32_t*>(arena.carve(block_bytes(count)));
  } else {
    const std::thread::id thread = stream == cudaStreamPerThread ? std::this_thread::get_id() : std::thread::id();
    StreamBlock& block = p.streams[{device, stream, thread}];
    if (block.count < count) {
      const std::size_t grown = std::max({count, 2 * block.count, kMinStreamCounters});
      if (auto* fresh = reinterpret_cast<std::uint32_t*>(arena.carve(block_bytes(grown)))) {
        block.counters = fresh;  // the old block stays zero and unused
        block.count = grown;
      }
    }
    if (block.count >= count) counters = block.counters;
  }
  if (!counters) (void)cudaGetLastError();  // a failed allocation is not the caller's error
  return counters;
}

}  // namespace fastattn::cuda_decode
