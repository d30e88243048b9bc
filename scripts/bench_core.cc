// Stage timings of the framework-free lattice core, without TensorFlow (run with
// `make bench-core`): embed + hash, blur neighbours, splat lists and filter, plus the splat
// alternatives that docs/lattice_op.md weighs. Reads a reference written by
// `scripts/bench_lattice.py --dump DIR`: DIR/<name>/meta.txt ("voxels features channels"),
// features.f32 [voxels, features] and values.f32 [voxels, channels], both raw float32.
//
//   bench_core DIR/<name> THREADS [REPEATS]
//
// Prints the minimum over REPEATS runs of each stage (the minimum is the figure least disturbed
// by other work on the machine), then the filter's bytes per voxel against a memory-bandwidth
// floor: a STREAM-like copy measures the bandwidth with the same thread count, and the floor is
// the time to move the bytes the filter must move at that rate (see PrintBandwidthFloor).
// The last line, "RESULT ...", repeats the figures as key=value pairs for scripts.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <string>
#include <vector>

#include "parallel.h"
#include "permutohedral.h"

namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// CPU seconds of the whole process (all threads): under load a stage's wall time includes the
// time its threads waited for a core, its CPU time does not.
double CpuNow() {
  timespec t{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &t);
  return static_cast<double>(t.tv_sec) + 1e-9 * static_cast<double>(t.tv_nsec);
}

bool ReadRaw(const std::string& path, std::vector<float>& out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return false;
  in.read(reinterpret_cast<char*>(out.data()), static_cast<std::streamsize>(out.size() * 4));
  return static_cast<size_t>(in.gcount()) == out.size() * 4;
}

// Copy bandwidth in bytes per second (bytes read + bytes written): the best of `repeats`
// copies of a 256 MiB float buffer, split between the threads as the core splits its loops.
double CopyBandwidth(const crf3d::Parallel& par, int repeats) {
  const int64_t count = int64_t{64} << 20;  // floats: 256 MiB per buffer
  std::vector<float> a(static_cast<size_t>(count), 1.0f), b(static_cast<size_t>(count), 0.0f);
  double best = 1e30;
  for (int r = 0; r < repeats; ++r) {
    const double t0 = Now();
    par.For(count, 2, [&](int64_t begin, int64_t end) {
      std::copy(a.data() + begin, a.data() + end, b.data() + begin);
    });
    best = std::min(best, Now() - t0);
    a[static_cast<size_t>(r)] = b[static_cast<size_t>(count - 1 - r)];  // keep the copies live
  }
  return 2.0 * 4.0 * static_cast<double>(count) / best;
}

// The bytes a filter call must move, per voxel, from the data layout (each array read or
// written once, at its size; gathers that hit the cache cost nothing more): n voxels, m lattice
// points, d1 = d + 1 vertices per voxel, C channels, 4-byte indices and floats.
//   splat: values 4C n, splat lists (voxel + weight) 8 d1 n, offsets 4 m, lattice rows 4C m;
//   blur, per direction (d1 of them): neighbour pairs 8 m, rows read 4C m and written 4C m;
//   slice: vertex_index + vertex_weight 8 d1 n, lattice rows 4C m, output 4C n.
struct FilterBytes {
  double splat, blur, slice;
  double total() const { return splat + blur + slice; }
};

FilterBytes CountFilterBytes(int64_t n, int64_t m, int64_t d1, int64_t c) {
  const double nv = static_cast<double>(n), mp = static_cast<double>(m);
  FilterBytes b;
  b.splat = 4.0 * c * nv + 8.0 * d1 * nv + 4.0 * mp + 4.0 * c * mp;
  b.blur = d1 * (8.0 * mp + 8.0 * c * mp);
  b.slice = 8.0 * d1 * nv + 4.0 * c * mp + 4.0 * c * nv;
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s DIR/<name> THREADS [REPEATS]\n", argv[0]);
    return 2;
  }
  const std::string dir = argv[1];
  const int threads = std::atoi(argv[2]);
  const int repeats = argc > 3 ? std::max(1, std::atoi(argv[3])) : 3;
  int64_t n = 0;
  int d = 0, channels = 0;
  {
    std::ifstream meta(dir + "/meta.txt");
    if (!(meta >> n >> d >> channels) || n <= 0 || d <= 0 || channels <= 0) {
      std::fprintf(stderr, "%s/meta.txt: expected 'voxels features channels'\n", dir.c_str());
      return 2;
    }
  }
  std::vector<float> features(static_cast<size_t>(n * d)), values(static_cast<size_t>(n * channels));
  if (!ReadRaw(dir + "/features.f32", features) || !ReadRaw(dir + "/values.f32", values)) {
    std::fprintf(stderr, "%s: features.f32 or values.f32 missing or too short\n", dir.c_str());
    return 2;
  }
  const crf3d::StdThreadParallel par(threads);
  const int64_t d1 = d + 1;
  const int64_t entries = n * d1;
  std::vector<int32_t> vertex_index(static_cast<size_t>(entries));
  std::vector<float> vertex_weight(static_cast<size_t>(entries));
  std::vector<int32_t> nbrs, offsets, voxels(static_cast<size_t>(entries));
  std::vector<float> weights(static_cast<size_t>(entries)), out(static_cast<size_t>(n * channels));
  double best[5] = {1e30, 1e30, 1e30, 1e30, 1e30};
  int64_t m = 0;
  const bool build_only = std::getenv("BENCH_CORE_BUILD_ONLY") != nullptr;
  double cpu[3] = {1e30, 1e30, 1e30};
  bool packed = false;  // whether the build packed its keys into 64-bit codes
  for (int r = 0; r < repeats; ++r) {
    const double c0 = CpuNow();
    const double t0 = Now();
    crf3d::LatticeBuilder builder;
    const crf3d::Status s = builder.Build(features.data(), n, d, int64_t{1} << 30, 0,
                                          vertex_index.data(), vertex_weight.data(), par);
    if (!s.ok()) {
      std::fprintf(stderr, "build failed: %s\n", s.message.c_str());
      return 1;
    }
    const double t1 = Now();
    const double c1 = CpuNow();
    m = builder.num_points();
    packed = builder.packed_keys();
    nbrs.assign(static_cast<size_t>(d1 * m * 2), 0);
    builder.BlurNeighbours(m, 0, nbrs.data(), par);
    const double t2 = Now();
    const double c2 = CpuNow();
    offsets.assign(static_cast<size_t>(m + 1), 0);
    crf3d::BuildSplatCsr(vertex_index.data(), vertex_weight.data(), n, d, m, offsets.data(),
                         voxels.data(), weights.data(), par);
    const double t3 = Now();
    const double c3 = CpuNow();
    cpu[0] = std::min(cpu[0], c1 - c0);
    cpu[1] = std::min(cpu[1], c2 - c1);
    cpu[2] = std::min(cpu[2], c3 - c2);
    if (build_only) {  // BENCH_CORE_BUILD_ONLY: the three build stages alone (for profilers)
      best[0] = std::min(best[0], t1 - t0);
      best[1] = std::min(best[1], t2 - t1);
      best[2] = std::min(best[2], t3 - t2);
      continue;
    }
    crf3d::LatticeView lat;
    lat.num_voxels = n;
    lat.d = d;
    lat.num_points = m;
    lat.vertex_index = vertex_index.data();
    lat.vertex_weight = vertex_weight.data();
    lat.blur_neighbours = nbrs.data();
    lat.splat_offsets = offsets.data();
    lat.splat_voxels = voxels.data();
    lat.splat_weights = weights.data();
    std::vector<float> scratch(static_cast<size_t>(crf3d::FilterScratchSize(lat, channels)));
    crf3d::Filter(lat, values.data(), channels, false, out.data(), scratch.data(), par);  // warm
    const double t4 = Now();
    for (int k = 0; k < 5; ++k) {
      crf3d::Filter(lat, values.data(), channels, false, out.data(), scratch.data(), par);
    }
    const double t5 = Now();
    // the same filter without the splat lists (parts' sums; what the op runs when the build
    // skips the lists, SplatNeedsLists)
    crf3d::LatticeView bare = lat;
    bare.splat_offsets = nullptr;
    bare.splat_voxels = nullptr;
    bare.splat_weights = nullptr;
    std::vector<float> bare_scratch(static_cast<size_t>(crf3d::FilterScratchSize(bare, channels)));
    crf3d::Filter(bare, values.data(), channels, false, out.data(), bare_scratch.data(), par);
    const double t6 = Now();
    for (int k = 0; k < 5; ++k) {
      crf3d::Filter(bare, values.data(), channels, false, out.data(), bare_scratch.data(), par);
    }
    const double t7 = Now();
    best[0] = std::min(best[0], t1 - t0);
    best[1] = std::min(best[1], t2 - t1);
    best[2] = std::min(best[2], t3 - t2);
    best[3] = std::min(best[3], (t5 - t4) / 5);
    best[4] = std::min(best[4], (t7 - t6) / 5);
  }
  const bool lists = crf3d::SplatNeedsLists(n, d, m);
  if (build_only) {
    std::printf("%s: %lld voxels, F = %d, %d thread(s), %lld lattice points, lists %d, "
                "keys %s\n"
                "  embed + hash %.3f s | blur neighbours %.3f s | splat lists %.3f s\n"
                "  CPU time (all threads): embed + hash %.3f s | blur neighbours %.3f s | "
                "splat lists %.3f s\n",
                dir.c_str(), static_cast<long long>(n), d, threads, static_cast<long long>(m),
                lists ? 1 : 0, packed ? "packed" : "wide", best[0], best[1], best[2], cpu[0],
                cpu[1], cpu[2]);
    return 0;
  }
  std::printf("%s: %lld voxels, F = %d, C = %d, %d thread(s), %lld lattice points, keys %s\n",
              dir.c_str(), static_cast<long long>(n), d, channels, threads,
              static_cast<long long>(m), packed ? "packed" : "wide");
  std::printf("  embed + hash %.3f s | blur neighbours %.3f s | splat lists %.3f s | "
              "build total %.3f s | filter %.3f s\n",
              best[0], best[1], best[2], best[0] + best[1] + best[2], best[3]);
  std::printf("  without splat lists (%s): build %.3f s | filter %.3f s (%.0f parts)\n",
              lists ? "the op keeps the lists here" : "the op's choice here", best[0] + best[1],
              best[4], static_cast<double>(crf3d::SplatParts(n, d, m)));

  const FilterBytes bytes = CountFilterBytes(n, m, d1, channels);
  const double bandwidth = CopyBandwidth(par, repeats);
  const double per_voxel = bytes.total() / static_cast<double>(n);
  const double floor_s = bytes.total() / bandwidth;
  std::printf("  filter bytes per voxel: splat %.0f + blur %.0f + slice %.0f = %.0f B | copy "
              "bandwidth %.2f GB/s (%d thread(s)) | floor %.3f s = %.1f ns/voxel | filter %.1f "
              "ns/voxel = %.2fx the floor\n",
              bytes.splat / static_cast<double>(n), bytes.blur / static_cast<double>(n),
              bytes.slice / static_cast<double>(n), per_voxel, bandwidth * 1e-9, threads, floor_s,
              floor_s * 1e9 / static_cast<double>(n), best[3] * 1e9 / static_cast<double>(n),
              best[3] / floor_s);
  // build_s and filter_s: what the op runs (with the lists only where SplatNeedsLists)
  std::printf("RESULT voxels=%lld features=%d channels=%d threads=%d points=%lld embed_s=%.6f "
              "neighbours_s=%.6f splat_lists_s=%.6f build_s=%.6f filter_s=%.6f "
              "filter_bytes_per_voxel=%.1f copy_gb_s=%.3f floor_s=%.6f lists=%d "
              "filter_lists_s=%.6f filter_no_lists_s=%.6f\n",
              static_cast<long long>(n), d, channels, threads, static_cast<long long>(m), best[0],
              best[1], best[2], best[0] + best[1] + (lists ? best[2] : 0.0),
              lists ? best[3] : best[4], per_voxel, bandwidth * 1e-9, floor_s, lists ? 1 : 0,
              best[3], best[4]);
  if (std::getenv("BENCH_CORE_STAGES_ONLY") != nullptr) return 0;

  // Splat alternatives, single-threaded, C = channels (docs/lattice_op.md):
  //  a. gather by entry number: lists of voxel * (d+1) + k, weights read from vertex_weight;
  //  b. gather with the voxel and weight in the list (what Filter does);
  //  c. scatter in voxel order (fastest, but the summation order of a point then depends on
  //     how voxels are split between threads).
  std::vector<int32_t> by_entry(static_cast<size_t>(entries));
  {
    std::vector<int32_t> next(offsets.begin(), offsets.end() - 1);
    for (int64_t i = 0; i < entries; ++i) by_entry[next[vertex_index[i]]++] = static_cast<int32_t>(i);
  }
  const int64_t C = channels;
  std::vector<float> acc(static_cast<size_t>((m + 1) * C));
  double alt[3] = {1e30, 1e30, 1e30};
  for (int r = 0; r < repeats; ++r) {
    double t0 = Now();
    for (int64_t p = 0; p < m; ++p) {
      float* row = acc.data() + p * C;
      std::fill(row, row + C, 0.0f);
      for (int32_t q = offsets[p]; q < offsets[p + 1]; ++q) {
        const int32_t e = by_entry[q];
        const float w = vertex_weight[e];
        const float* v = values.data() + (e / d1) * C;
        for (int64_t c = 0; c < C; ++c) row[c] += w * v[c];
      }
    }
    alt[0] = std::min(alt[0], Now() - t0);
    t0 = Now();
    for (int64_t p = 0; p < m; ++p) {
      float* row = acc.data() + p * C;
      std::fill(row, row + C, 0.0f);
      for (int32_t q = offsets[p]; q < offsets[p + 1]; ++q) {
        const float* v = values.data() + static_cast<int64_t>(voxels[q]) * C;
        for (int64_t c = 0; c < C; ++c) row[c] += weights[q] * v[c];
      }
    }
    alt[1] = std::min(alt[1], Now() - t0);
    t0 = Now();
    std::fill(acc.begin(), acc.end(), 0.0f);
    for (int64_t i = 0; i < n; ++i) {
      const float* v = values.data() + i * C;
      for (int64_t k = 0; k < d1; ++k) {
        float* row = acc.data() + static_cast<int64_t>(vertex_index[i * d1 + k]) * C;
        for (int64_t c = 0; c < C; ++c) row[c] += vertex_weight[i * d1 + k] * v[c];
      }
    }
    alt[2] = std::min(alt[2], Now() - t0);
  }
  std::printf("  splat, 1 thread: gather by entry %.3f s | gather voxel+weight lists %.3f s | "
              "scatter in voxel order %.3f s\n",
              alt[0], alt[1], alt[2]);
  return 0;
}
