// Shared by the kernels that stream a weight for a few rows (a decode step's products): the
// weight's rows cut into contiguous chunks, each chunk's product a partial sum. One core
// streams a contiguous chunk at about the cache's rate; two cores reading the blocks of
// columns of every row (256-byte runs, the other thread's in between) reached ~40 GB/s where
// contiguous halves reached ~55 GB/s (a 128 KB matrix, 2 threads, /tmp C++ measurement, this
// VM). The chunks depend on the shapes only, never on the threads, so the sums are the same on
// any machine.
#pragma once

#include <algorithm>
#include <cstdint>
#include <utility>

namespace dsv3 {

// Products of at most this many rows are chunked (more rows reuse each weight row, and the
// columns or the groups are the parallel work).
constexpr int64_t kFewRows = 8;
// Bytes of weight per chunk, at least; at most kMostChunks chunks (the parallel work of a
// large weight on many cores), and their partial products at most kPartialBytes.
constexpr int64_t kChunkBytes = 64 << 10;
constexpr int64_t kMostChunks = 16;
constexpr int64_t kPartialBytes = 4 << 20;

// Chunks of a [depth, width] float32 weight's rows, for a product of `rows` rows.
inline int64_t RowChunks(int64_t depth, int64_t width, int64_t rows) {
  if (rows > kFewRows || rows < 1 || width < 1) return 1;
  const int64_t bytes = int64_t{sizeof(float)} * width;
  const int64_t most = std::min({kMostChunks, depth, kPartialBytes / (rows * bytes) + 1});
  return std::clamp<int64_t>(depth * bytes / kChunkBytes, 1, std::max<int64_t>(1, most));
}

// [c · depth / chunks, (c + 1) · depth / chunks): chunk c's rows.
inline std::pair<int64_t, int64_t> ChunkRows(int64_t depth, int64_t c, int64_t chunks) {
  return {depth * c / chunks, depth * (c + 1) / chunks};
}

}  // namespace dsv3
