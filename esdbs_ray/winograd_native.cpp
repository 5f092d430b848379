// Winograd-ReLU F(2x2, 3x3) for the CPU, shape-generic: the four passes over memory of a training step
// that are not GEMMs; on AVX-512 CPUs the 16 GEMMs too (elsewhere those stay torch.bmm), and the layer
// fused band by band; and the sparse layer, the 16 products on a pruned U's nonzeros only (see "the
// sparse layer" below; esdbs_ray/winograd_sparse.py calls it), with its chains of layers and max-pools
// in the lane layout (esdbs_ray/winograd_chain.py).  Built once per machine by esdbs_ray/winograd_native.py with the system C++
// compiler (no torch headers: 2-4 s), and called through ctypes on raw pointers.  The maths and the
// layouts are those of winograd.py:
//
//   activations NHWC (a channels-last tensor's memory), tile grid th x tw = ceil(H/2) x ceil(W/2),
//   tile t = (n * th + i) * tw + j, tile position k = 4 p + q (p: row / H transform index, q: column),
//   V, M, dM, dV: (16, N * th * tw, C or K) -- plane k, then tile, then channel.
//
// Every kernel walks tiles with the channel loop innermost (contiguous, vectorised by `omp simd`), so
// each 4x4 input tile is read once and the 16 planes are written once.  B^T, A^T hold only 0 and +-1:
// the transforms are additions, written out below as in Lavin & Gray (paper eq. 1 and 2).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <new>
#include <type_traits>
#include <vector>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef int64_t i64;

namespace {

// ReLU and its mask as compile-time choices: a runtime flag inside the channel loop keeps gcc from
// vectorising it.  Written as torch's are: a NaN passes the ReLU (and its gradient passes the mask),
// so a diverging run shows NaN downstream instead of zeros.
template <bool RELU, typename T>
inline T clip(T v) { return RELU ? (v <= T(0) ? T(0) : v) : v; }

template <bool RELU, typename T>
inline T mask(T g, T v) { return RELU ? (v <= T(0) ? T(0) : g) : g; }

// ---------------------------------------------------------------------------------------------------
// the four passes, one row of tiles at a time
// ---------------------------------------------------------------------------------------------------
// Each function handles tile row i of image n.  Transformed tiles live in a (16, tiles, C) buffer whose
// planes are ps elements apart; `V`, `M`, ... point at this row's first tile in it: the whole batch's
// buffer (the unfused passes below) or one band's (the fused layer further down).

// forward: V = [ReLU](B^T d B) from the zero-padded input (padding 1, rounded up to whole tiles).
// One tile (column j of a tile row whose four input rows are `row`, `rin` saying which lie inside the
// image): its 16 planes of C values to `out`, planes ps apart.
template <typename T, bool RELU>
inline void input_tile(const T* const* row, const bool* rin, T* __restrict out, i64 ps, i64 j, i64 W, i64 C,
                       const T* z) {
  // the tile's 16 input rows of C values (a zero row outside the image), as named restrict
  // pointers: held in an array, gcc cannot prove the stores below leave them alone and does not
  // vectorise the channel loop
  auto at = [=](int a, int b) -> const T* {
    const i64 w = 2 * j + b - 1;
    return rin[a] && w >= 0 && w < W ? row[a] + w * C : z;
  };
  const T *__restrict d00 = at(0, 0), *__restrict d01 = at(0, 1), *__restrict d02 = at(0, 2), *__restrict d03 = at(0, 3);
  const T *__restrict d10 = at(1, 0), *__restrict d11 = at(1, 1), *__restrict d12 = at(1, 2), *__restrict d13 = at(1, 3);
  const T *__restrict d20 = at(2, 0), *__restrict d21 = at(2, 1), *__restrict d22 = at(2, 2), *__restrict d23 = at(2, 3);
  const T *__restrict d30 = at(3, 0), *__restrict d31 = at(3, 1), *__restrict d32 = at(3, 2), *__restrict d33 = at(3, 3);
#pragma omp simd
  for (i64 c = 0; c < C; ++c) {
    // B^T along the columns of each input row a: r[a][q]
    const T r00 = d00[c] - d02[c], r01 = d01[c] + d02[c], r02 = d02[c] - d01[c], r03 = d01[c] - d03[c];
    const T r10 = d10[c] - d12[c], r11 = d11[c] + d12[c], r12 = d12[c] - d11[c], r13 = d11[c] - d13[c];
    const T r20 = d20[c] - d22[c], r21 = d21[c] + d22[c], r22 = d22[c] - d21[c], r23 = d21[c] - d23[c];
    const T r30 = d30[c] - d32[c], r31 = d31[c] + d32[c], r32 = d32[c] - d31[c], r33 = d31[c] - d33[c];
    // then along the rows: plane 4p + q (stores written out: gcc leaves a 16-step loop inside the
    // channel loop rolled, and then vectorises nothing)
    T* __restrict o = out + c;
    o[0 * ps] = clip<RELU>(r00 - r20); o[1 * ps] = clip<RELU>(r01 - r21);
    o[2 * ps] = clip<RELU>(r02 - r22); o[3 * ps] = clip<RELU>(r03 - r23);
    o[4 * ps] = clip<RELU>(r10 + r20); o[5 * ps] = clip<RELU>(r11 + r21);
    o[6 * ps] = clip<RELU>(r12 + r22); o[7 * ps] = clip<RELU>(r13 + r23);
    o[8 * ps] = clip<RELU>(r20 - r10); o[9 * ps] = clip<RELU>(r21 - r11);
    o[10 * ps] = clip<RELU>(r22 - r12); o[11 * ps] = clip<RELU>(r23 - r13);
    o[12 * ps] = clip<RELU>(r10 - r30); o[13 * ps] = clip<RELU>(r11 - r31);
    o[14 * ps] = clip<RELU>(r12 - r32); o[15 * ps] = clip<RELU>(r13 - r33);
  }
}

// the four input rows of tile row i of image n (row[a] valid where rin[a])
template <typename T>
inline void input_rows(const T* x, i64 n, i64 i, i64 H, i64 W, i64 C, const T** row, bool* rin) {
  for (int a = 0; a < 4; ++a) {
    const i64 h = 2 * i + a - 1;
    rin[a] = h >= 0 && h < H;
    row[a] = x + (n * H + (rin[a] ? h : 0)) * W * C;
  }
}

template <typename T, bool RELU>
inline void input_row(const T* __restrict x, T* __restrict V, i64 ps, i64 n, i64 i, i64 H, i64 W, i64 C,
                      const T* z) {
  const i64 tw = (W + 1) / 2;
  const T* row[4];
  bool rin[4];
  input_rows(x, n, i, H, W, C, row, rin);
  for (i64 j = 0; j < tw; ++j) input_tile<T, RELU>(row, rin, V + j * C, ps, j, W, C, z);
}

// forward: Y = A^T M A per tile, cropped to H x W, written NHWC.  One tile (column j of a tile row
// whose output rows start at y0, y1; h1: the second lies inside the image) from `m`, planes ps apart.
// The inference epilogue, compile-time choices as the ReLU above: BIAS adds bias[k] (a folded batch
// norm's shift) to each output, ORELU then clips it at 0 (a spatial ReLU that followed the layer) --
// what torch did after the layer, in the same order, without another pass over the output.
template <typename T, bool BIAS = false, bool ORELU = false>
inline void output_tile(const T* __restrict m, i64 ps, T* y0, T* y1, bool h1, i64 j, i64 W, i64 K,
                        const T* __restrict bias = nullptr) {
  const bool w1 = 2 * j + 1 < W;
  T* o00 = y0 + 2 * j * K;
#pragma omp simd
  for (i64 k = 0; k < K; ++k) {
    T t[4][2];  // t[p][b]: A^T along the columns of M's row p
    for (int p = 0; p < 4; ++p) {
      const T m0 = m[(4 * p + 0) * ps + k], m1 = m[(4 * p + 1) * ps + k];
      const T m2 = m[(4 * p + 2) * ps + k], m3 = m[(4 * p + 3) * ps + k];
      t[p][0] = m0 + m1 + m2; t[p][1] = m1 - m2 - m3;
    }
    const T b = BIAS ? bias[k] : T(0);
    auto epi = [b](T v) { return clip<ORELU>(BIAS ? v + b : v); };
    o00[k] = epi(t[0][0] + t[1][0] + t[2][0]);
    if (w1) o00[K + k] = epi(t[0][1] + t[1][1] + t[2][1]);
    if (h1) {
      T* o10 = y1 + 2 * j * K;
      o10[k] = epi(t[1][0] - t[2][0] - t[3][0]);
      if (w1) o10[K + k] = epi(t[1][1] - t[2][1] - t[3][1]);
    }
  }
}

template <typename T, bool BIAS = false, bool ORELU = false>
inline void output_row(const T* __restrict M, i64 ps, T* __restrict y, i64 n, i64 i, i64 H, i64 W, i64 K,
                       const T* bias = nullptr) {
  const i64 tw = (W + 1) / 2;
  const bool h1 = 2 * i + 1 < H;
  T* y0 = y + (n * H + 2 * i) * W * K;
  T* y1 = y0 + W * K;
  for (i64 j = 0; j < tw; ++j) output_tile<T, BIAS, ORELU>(M + j * K, ps, y0, y1, h1, j, W, K, bias);
}

// f(BIAS, ORELU) with the epilogue's two choices as compile-time constants (std::bool_constant)
template <typename F>
inline void with_epilogue(bool bias, bool orelu, F&& f) {
  if (bias && orelu) f(std::true_type{}, std::true_type{});
  else if (bias) f(std::true_type{}, std::false_type{});
  else if (orelu) f(std::false_type{}, std::true_type{});
  else f(std::false_type{}, std::false_type{});
}

// backward: dM = A dY A^T per tile (the adjoint of output_tile; rows / columns past H, W are 0).  One
// tile: g0, g1 its two gradient rows (g1 valid where h1), z a zero row.
template <typename T>
inline void output_adjoint_tile(const T* g0, const T* g1, bool h1, T* __restrict out, i64 ps, i64 j, i64 W, i64 K,
                                const T* z) {
  const bool w1 = 2 * j + 1 < W;
  const T* __restrict g00 = g0 + 2 * j * K;
  const T* __restrict g01 = w1 ? g00 + K : z;
  const T* __restrict g10 = h1 ? g1 + 2 * j * K : z;
  const T* __restrict g11 = h1 && w1 ? g10 + K : z;
#pragma omp simd
  for (i64 k = 0; k < K; ++k) {
    // A = (A^T)^T sends (g0, g1) to (g0, g0 + g1, g0 - g1, -g1), along columns, then rows
    const T a0 = g00[k], a1 = g01[k], b0 = g10[k], b1 = g11[k];
    const T s0[4] = {a0, a0 + a1, a0 - a1, -a1};
    const T s1[4] = {b0, b0 + b1, b0 - b1, -b1};
    for (int q = 0; q < 4; ++q) {
      out[(0 + q) * ps + k] = s0[q];
      out[(4 + q) * ps + k] = s0[q] + s1[q];
      out[(8 + q) * ps + k] = s0[q] - s1[q];
      out[(12 + q) * ps + k] = -s1[q];
    }
  }
}

template <typename T>
inline void output_adjoint_row(const T* __restrict gy, T* __restrict dM, i64 ps, i64 n, i64 i, i64 H, i64 W,
                               i64 K, const T* z) {
  const i64 tw = (W + 1) / 2;
  const bool h1 = 2 * i + 1 < H;
  const T* g0 = gy + (n * H + 2 * i) * W * K;
  const T* g1 = h1 ? g0 + W * K : nullptr;
  for (i64 j = 0; j < tw; ++j) output_adjoint_tile(g0, g1, h1, dM + j * K, ps, j, W, K, z);
}

// backward: dx += B [dV masked by V > 0] B^T per tile, overlap-added into image n's pixels (`img`).
// Tiles overlap by two pixels in each direction: one thread adds all of an image's tile rows, in
// order, and tiles of a row left to right.  Pixels outside the image (padding) go to `sink`, 16
// scratch rows of C values (one per tile position: the restrict pointers never alias), so the channel
// loop has no branches.  One tile: row[a] the image row of its input row a (nullptr outside).
template <typename T, bool RELU>
inline void input_adjoint_tile(T* const* row, const T* __restrict g, const T* __restrict v, i64 ps, i64 j, i64 W,
                               i64 C, T* sink) {
  auto at = [=](int a, int b) -> T* {
    const i64 w = 2 * j + b - 1;
    return row[a] && w >= 0 && w < W ? row[a] + w * C : sink + (4 * a + b) * C;
  };
  T *__restrict o00 = at(0, 0), *__restrict o01 = at(0, 1), *__restrict o02 = at(0, 2), *__restrict o03 = at(0, 3);
  T *__restrict o10 = at(1, 0), *__restrict o11 = at(1, 1), *__restrict o12 = at(1, 2), *__restrict o13 = at(1, 3);
  T *__restrict o20 = at(2, 0), *__restrict o21 = at(2, 1), *__restrict o22 = at(2, 2), *__restrict o23 = at(2, 3);
  T *__restrict o30 = at(3, 0), *__restrict o31 = at(3, 1), *__restrict o32 = at(3, 2), *__restrict o33 = at(3, 3);
#pragma omp simd
  for (i64 c = 0; c < C; ++c) {
    // V holds ReLU(B^T d B): V > 0 exactly where the pre-activation was positive
    const T* __restrict gc = g + c;
    const T* __restrict vc = v + c;
    T e[4][4];  // e[p][b]: B along the columns of row p, (g0, g1 - g2 + g3, g1 + g2 - g0, -g3)
#define ESDBS_ROW(p)                                                                              \
  {                                                                                              \
    const T g0 = mask<RELU>(gc[(4 * p + 0) * ps], vc[(4 * p + 0) * ps]);                          \
    const T g1 = mask<RELU>(gc[(4 * p + 1) * ps], vc[(4 * p + 1) * ps]);                          \
    const T g2 = mask<RELU>(gc[(4 * p + 2) * ps], vc[(4 * p + 2) * ps]);                          \
    const T g3 = mask<RELU>(gc[(4 * p + 3) * ps], vc[(4 * p + 3) * ps]);                          \
    e[p][0] = g0; e[p][1] = g1 - g2 + g3; e[p][2] = g1 + g2 - g0; e[p][3] = -g3;                 \
  }
    ESDBS_ROW(0) ESDBS_ROW(1) ESDBS_ROW(2) ESDBS_ROW(3)
#undef ESDBS_ROW
    // then along the rows, added into the overlapping tile pixels
    o00[c] += e[0][0]; o01[c] += e[0][1]; o02[c] += e[0][2]; o03[c] += e[0][3];
    o10[c] += e[1][0] - e[2][0] + e[3][0]; o11[c] += e[1][1] - e[2][1] + e[3][1];
    o12[c] += e[1][2] - e[2][2] + e[3][2]; o13[c] += e[1][3] - e[2][3] + e[3][3];
    o20[c] += e[1][0] + e[2][0] - e[0][0]; o21[c] += e[1][1] + e[2][1] - e[0][1];
    o22[c] += e[1][2] + e[2][2] - e[0][2]; o23[c] += e[1][3] + e[2][3] - e[0][3];
    o30[c] -= e[3][0]; o31[c] -= e[3][1]; o32[c] -= e[3][2]; o33[c] -= e[3][3];
  }
}

// the image rows of tile row i's four input rows (nullptr outside the image)
template <typename T>
inline void image_rows(T* img, i64 i, i64 H, i64 W, i64 C, T** row) {
  for (int a = 0; a < 4; ++a) {
    const i64 h = 2 * i + a - 1;
    row[a] = h >= 0 && h < H ? img + h * W * C : nullptr;
  }
}

template <typename T, bool RELU>
inline void input_adjoint_row(const T* __restrict dV, const T* __restrict V, i64 ps, T* img, i64 i, i64 H, i64 W,
                              i64 C, T* sink) {
  const i64 tw = (W + 1) / 2;
  T* row[4];
  image_rows(img, i, H, W, C, row);
  for (i64 j = 0; j < tw; ++j) input_adjoint_tile<T, RELU>(row, dV + j * C, V + j * C, ps, j, W, C, sink);
}

// The two per-tile transforms above on 16 given tap pointers (d[4a + b]: the tile's input pixel (a, b),
// or a zero row; o[4a + b]: where its gradient adds up, or a sink row), channels c0 .. c0 + nc: the
// sparse layer computes a tile's taps once and then runs these a channel block at a time.
template <typename T, bool RELU>
inline void input_taps(const T* const* d, i64 c0, i64 nc, T* __restrict out, i64 ps) {
  const T *__restrict d00 = d[0] + c0, *__restrict d01 = d[1] + c0, *__restrict d02 = d[2] + c0, *__restrict d03 = d[3] + c0;
  const T *__restrict d10 = d[4] + c0, *__restrict d11 = d[5] + c0, *__restrict d12 = d[6] + c0, *__restrict d13 = d[7] + c0;
  const T *__restrict d20 = d[8] + c0, *__restrict d21 = d[9] + c0, *__restrict d22 = d[10] + c0, *__restrict d23 = d[11] + c0;
  const T *__restrict d30 = d[12] + c0, *__restrict d31 = d[13] + c0, *__restrict d32 = d[14] + c0, *__restrict d33 = d[15] + c0;
#pragma omp simd
  for (i64 c = 0; c < nc; ++c) {
    const T r00 = d00[c] - d02[c], r01 = d01[c] + d02[c], r02 = d02[c] - d01[c], r03 = d01[c] - d03[c];
    const T r10 = d10[c] - d12[c], r11 = d11[c] + d12[c], r12 = d12[c] - d11[c], r13 = d11[c] - d13[c];
    const T r20 = d20[c] - d22[c], r21 = d21[c] + d22[c], r22 = d22[c] - d21[c], r23 = d21[c] - d23[c];
    const T r30 = d30[c] - d32[c], r31 = d31[c] + d32[c], r32 = d32[c] - d31[c], r33 = d31[c] - d33[c];
    T* __restrict o = out + c;
    o[0 * ps] = clip<RELU>(r00 - r20); o[1 * ps] = clip<RELU>(r01 - r21);
    o[2 * ps] = clip<RELU>(r02 - r22); o[3 * ps] = clip<RELU>(r03 - r23);
    o[4 * ps] = clip<RELU>(r10 + r20); o[5 * ps] = clip<RELU>(r11 + r21);
    o[6 * ps] = clip<RELU>(r12 + r22); o[7 * ps] = clip<RELU>(r13 + r23);
    o[8 * ps] = clip<RELU>(r20 - r10); o[9 * ps] = clip<RELU>(r21 - r11);
    o[10 * ps] = clip<RELU>(r22 - r12); o[11 * ps] = clip<RELU>(r23 - r13);
    o[12 * ps] = clip<RELU>(r10 - r30); o[13 * ps] = clip<RELU>(r11 - r31);
    o[14 * ps] = clip<RELU>(r12 - r32); o[15 * ps] = clip<RELU>(r13 - r33);
  }
}

// (the gradient, already masked by the ReLU: B g B^T added into the 16 taps)
template <typename T>
inline void input_adjoint_taps(T* const* o, i64 c0, i64 nc, const T* __restrict g, i64 ps) {
  T *__restrict o00 = o[0] + c0, *__restrict o01 = o[1] + c0, *__restrict o02 = o[2] + c0, *__restrict o03 = o[3] + c0;
  T *__restrict o10 = o[4] + c0, *__restrict o11 = o[5] + c0, *__restrict o12 = o[6] + c0, *__restrict o13 = o[7] + c0;
  T *__restrict o20 = o[8] + c0, *__restrict o21 = o[9] + c0, *__restrict o22 = o[10] + c0, *__restrict o23 = o[11] + c0;
  T *__restrict o30 = o[12] + c0, *__restrict o31 = o[13] + c0, *__restrict o32 = o[14] + c0, *__restrict o33 = o[15] + c0;
#pragma omp simd
  for (i64 c = 0; c < nc; ++c) {
    const T* __restrict gc = g + c;
    T e[4][4];
    for (int p = 0; p < 4; ++p) {
      const T g0 = gc[(4 * p + 0) * ps], g1 = gc[(4 * p + 1) * ps], g2 = gc[(4 * p + 2) * ps], g3 = gc[(4 * p + 3) * ps];
      e[p][0] = g0; e[p][1] = g1 - g2 + g3; e[p][2] = g1 + g2 - g0; e[p][3] = -g3;
    }
    o00[c] += e[0][0]; o01[c] += e[0][1]; o02[c] += e[0][2]; o03[c] += e[0][3];
    o10[c] += e[1][0] - e[2][0] + e[3][0]; o11[c] += e[1][1] - e[2][1] + e[3][1];
    o12[c] += e[1][2] - e[2][2] + e[3][2]; o13[c] += e[1][3] - e[2][3] + e[3][3];
    o20[c] += e[1][0] + e[2][0] - e[0][0]; o21[c] += e[1][1] + e[2][1] - e[0][1];
    o22[c] += e[1][2] + e[2][2] - e[0][2]; o23[c] += e[1][3] + e[2][3] - e[0][3];
    o30[c] -= e[3][0]; o31[c] -= e[3][1]; o32[c] -= e[3][2]; o33[c] -= e[3][3];
  }
}

// ---------------------------------------------------------------------------------------------------
// the unfused passes: each over the whole batch, V / M / dM / dV whole (16, N * th * tw, C) tensors
// ---------------------------------------------------------------------------------------------------
template <typename T, bool RELU>
void input_transform(const T* x, T* V, i64 N, i64 H, i64 W, i64 C, int nt) {
  const i64 th = (H + 1) / 2, tw = (W + 1) / 2, ps = N * th * tw * C;
  std::vector<T> zeros(C, T(0));
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
  for (i64 n = 0; n < N; ++n)
    for (i64 i = 0; i < th; ++i) input_row<T, RELU>(x, V + (n * th + i) * tw * C, ps, n, i, H, W, C, zeros.data());
}

template <typename T>
void output_transform(const T* M, T* y, i64 N, i64 H, i64 W, i64 K, int nt, const T* bias, bool orelu) {
  const i64 th = (H + 1) / 2, tw = (W + 1) / 2, ps = N * th * tw * K;
  with_epilogue(bias != nullptr, orelu, [&](auto B, auto R) {
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
    for (i64 n = 0; n < N; ++n)
      for (i64 i = 0; i < th; ++i)
        output_row<T, decltype(B)::value, decltype(R)::value>(M + (n * th + i) * tw * K, ps, y, n, i, H, W, K, bias);
  });
}

template <typename T>
void output_transform_adjoint(const T* gy, T* dM, i64 N, i64 H, i64 W, i64 K, int nt) {
  const i64 th = (H + 1) / 2, tw = (W + 1) / 2, ps = N * th * tw * K;
  std::vector<T> zeros(K, T(0));
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
  for (i64 n = 0; n < N; ++n)
    for (i64 i = 0; i < th; ++i) output_adjoint_row(gy, dM + (n * th + i) * tw * K, ps, n, i, H, W, K, zeros.data());
}

// images are the unit of parallel work: no two threads add into one pixel
template <typename T, bool RELU>
void input_transform_adjoint(const T* dV, const T* V, T* dx, i64 N, i64 H, i64 W, i64 C, int nt) {
  const i64 th = (H + 1) / 2, tw = (W + 1) / 2, ps = N * th * tw * C;
#pragma omp parallel for schedule(static) num_threads(nt)
  for (i64 n = 0; n < N; ++n) {
    T* img = dx + n * H * W * C;
    std::fill(img, img + H * W * C, T(0));
    std::vector<T> sink(16 * C);
    for (i64 i = 0; i < th; ++i) {
      const i64 t = (n * th + i) * tw * C;
      input_adjoint_row<T, RELU>(dV + t, V + t, ps, img, i, H, W, C, sink.data());
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// the 16 GEMMs, AVX-512 (compiled where torch itself dispatches to AVX-512)
// ---------------------------------------------------------------------------------------------------
// Why not torch.bmm: on CPUs that MKL does not run its AVX-512 code on (AMD EPYC: 99 GF/s for a
// 2048^2 sgemm against oneDNN's 200 GF/s for a 3x3 conv on the same core) the GEMMs were 80 % of the
// layer's step.  These kernels are the textbook register-blocked ones: an MR x (16 NV) block of the
// output lives in MR * NV zmm registers (MR * NV <= 24) while the reduction streams a broadcast A
// element per row and NV vectors of a B row; the last vector of a row is masked, so any width works.
// The accumulators are named variables, not an array: gcc keeps an array of __m512 on the stack and
// stores it at every step (a third of the speed).
#if defined(__AVX512F__)
#define ESDBS_HAS_GEMM 1

// C[r][0 : 16 NV] (+)= sum_c A(r, c) B[c][0 : 16 NV] for r < MR, c < n; B rows ldb apart, C rows ldc
// apart.  A(r, c) = A[r * lda + c] (row-major), or with AT A[c * lda + r] (A transposed).
template <int MR, int NV, bool ACC, bool AT>
inline void micro(const float* __restrict A, i64 lda, const float* __restrict B, i64 ldb,
                  float* __restrict C, i64 ldc, i64 n, __mmask16 last) {
#define ESDBS_ACC(r) __m512 c##r##_0 = _mm512_setzero_ps(), c##r##_1 = c##r##_0, c##r##_2 = c##r##_0, c##r##_3 = c##r##_0;
  ESDBS_ACC(0) ESDBS_ACC(1) ESDBS_ACC(2) ESDBS_ACC(3) ESDBS_ACC(4) ESDBS_ACC(5) ESDBS_ACC(6) ESDBS_ACC(7)
  ESDBS_ACC(8) ESDBS_ACC(9) ESDBS_ACC(10) ESDBS_ACC(11) ESDBS_ACC(12) ESDBS_ACC(13) ESDBS_ACC(14) ESDBS_ACC(15)
#undef ESDBS_ACC
  for (i64 c = 0; c < n; ++c) {
    const float* __restrict b = B + c * ldb;
    const float* __restrict a = AT ? A + c * lda : A + c;  // then A(r, c) = a[r * (AT ? 1 : lda)]
    const __m512 b0 = NV == 1 ? _mm512_maskz_loadu_ps(last, b) : _mm512_loadu_ps(b);
    const __m512 b1 = NV < 2 ? b0 : NV == 2 ? _mm512_maskz_loadu_ps(last, b + 16) : _mm512_loadu_ps(b + 16);
    const __m512 b2 = NV < 3 ? b0 : NV == 3 ? _mm512_maskz_loadu_ps(last, b + 32) : _mm512_loadu_ps(b + 32);
    const __m512 b3 = NV < 4 ? b0 : _mm512_maskz_loadu_ps(last, b + 48);
#define ESDBS_ROW(r)                                                                   \
    if constexpr (MR > r) {                                                            \
      const __m512 ar = _mm512_set1_ps(a[AT ? r : r * lda]);                           \
      c##r##_0 = _mm512_fmadd_ps(ar, b0, c##r##_0);                                    \
      if constexpr (NV > 1) c##r##_1 = _mm512_fmadd_ps(ar, b1, c##r##_1);              \
      if constexpr (NV > 2) c##r##_2 = _mm512_fmadd_ps(ar, b2, c##r##_2);              \
      if constexpr (NV > 3) c##r##_3 = _mm512_fmadd_ps(ar, b3, c##r##_3);              \
    }
    ESDBS_ROW(0) ESDBS_ROW(1) ESDBS_ROW(2) ESDBS_ROW(3) ESDBS_ROW(4) ESDBS_ROW(5) ESDBS_ROW(6) ESDBS_ROW(7)
    ESDBS_ROW(8) ESDBS_ROW(9) ESDBS_ROW(10) ESDBS_ROW(11) ESDBS_ROW(12) ESDBS_ROW(13) ESDBS_ROW(14) ESDBS_ROW(15)
#undef ESDBS_ROW
  }
#define ESDBS_ST(r, v)                                                                              \
  if constexpr (MR > r && NV > v) {                                                                 \
    float* o = C + r * ldc + 16 * v;                                                                \
    const __mmask16 m = v == NV - 1 ? last : (__mmask16)0xFFFF;                                     \
    _mm512_mask_storeu_ps(o, m, ACC ? _mm512_add_ps(_mm512_maskz_loadu_ps(m, o), c##r##_##v) : c##r##_##v); \
  }
#define ESDBS_STROW(r) ESDBS_ST(r, 0) ESDBS_ST(r, 1) ESDBS_ST(r, 2) ESDBS_ST(r, 3)
  ESDBS_STROW(0) ESDBS_STROW(1) ESDBS_STROW(2) ESDBS_STROW(3) ESDBS_STROW(4) ESDBS_STROW(5) ESDBS_STROW(6)
  ESDBS_STROW(7) ESDBS_STROW(8) ESDBS_STROW(9) ESDBS_STROW(10) ESDBS_STROW(11) ESDBS_STROW(12)
  ESDBS_STROW(13) ESDBS_STROW(14) ESDBS_STROW(15)
#undef ESDBS_STROW
#undef ESDBS_ST
}

// Rows [0, m) of an output column block [0, 16 NV) (the block's true width w <= 16 NV sets the
// mask): full MR-row micro-tiles, then the leftover rows in tiles of 8, 4, 2, 1 (few instantiations:
// the library compiles in ~2 s).
template <int MR, int NV, bool ACC, bool AT>
void rows(const float* A, i64 lda, const float* B, i64 ldb, float* C, i64 ldc, i64 m, i64 n, i64 w) {
  const int rem = int(w - 16 * (NV - 1));
  const __mmask16 last = rem >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << rem) - 1);
  const i64 step = AT ? 1 : lda;  // from one output row's A to the next
  i64 r = 0;
  for (; r + MR <= m; r += MR) {
    if constexpr (!AT) if (n >= 48) {  // A's next MR rows: fetched while this tile computes (above)
      const char* next = (const char*)(A + (r + MR) * lda);
      const i64 bytes = std::min<i64>(MR, m - r - MR) * lda * (i64)sizeof(float);
      for (i64 o = 0; o < bytes; o += 64) _mm_prefetch(next + o, _MM_HINT_T0);
    }
    micro<MR, NV, ACC, AT>(A + r * step, lda, B, ldb, C + r * ldc, ldc, n, last);
  }
#define ESDBS_TAIL(k)                                                                                \
  if constexpr (k < MR)                                                                              \
    if (m - r >= k) {                                                                                \
      micro<k, NV, ACC, AT>(A + r * step, lda, B, ldb, C + r * ldc, ldc, n, last);                   \
      r += k;                                                                                        \
    }
  ESDBS_TAIL(8) ESDBS_TAIL(4) ESDBS_TAIL(2) ESDBS_TAIL(1)
#undef ESDBS_TAIL
}

// One output column block (w <= 64 columns wide) of rows [0, m): the micro-tile shape by its width.
template <bool ACC, bool AT>
void block(const float* A, i64 lda, const float* B, i64 ldb, float* C, i64 ldc, i64 m, i64 n, i64 w) {
  if (w > 48) rows<6, 4, ACC, AT>(A, lda, B, ldb, C, ldc, m, n, w);
  else if (w > 32) rows<8, 3, ACC, AT>(A, lda, B, ldb, C, ldc, m, n, w);
  else if (w > 16) rows<12, 2, ACC, AT>(A, lda, B, ldb, C, ldc, m, n, w);
  else rows<16, 1, ACC, AT>(A, lda, B, ldb, C, ldc, m, n, w);
}

// C[p] = A[p] B[p] for p < P: A (T x n) row-major, B (n x K), C (T x K).  Tasks are row chunks of one
// p (a multiple of every MR), so each output element is computed by one thread in one order.
void gemm_nn(const float* A, const float* B, float* C, i64 P, i64 T, i64 n, i64 K, int nt) {
  const i64 TB = 240, chunks = (T + TB - 1) / TB;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
  for (i64 p = 0; p < P; ++p)
    for (i64 ch = 0; ch < chunks; ++ch) {
      const i64 t0 = ch * TB, m = std::min(TB, T - t0);
      const float* Ap = A + (p * T + t0) * n;
      float* Cp = C + (p * T + t0) * K;
      for (i64 k0 = 0; k0 < K; k0 += 64)
        block<false, false>(Ap, n, B + p * n * K + k0, K, Cp + k0, K, m, n, std::min<i64>(64, K - k0));
    }
}

// C[p] = A[p]^T B[p] for p < P: A (T x Cd), B (T x K), C (Cd x K); the reduction runs over T in
// chunks that keep both operands' rows in L2.  Tasks are (p, column block) pairs, each owning its
// outputs and summing T in one order: no partial sums to reduce, the same result at any thread count.
void gemm_tn(const float* A, const float* B, float* C, i64 P, i64 T, i64 Cd, i64 K, int nt) {
  if (T == 0) {  // an empty sum
    std::fill(C, C + P * Cd * K, 0.0f);
    return;
  }
  const i64 kb = (K + 63) / 64;
  const i64 TC = std::max<i64>(48, (i64(1) << 17) / std::max<i64>(1, Cd + 64));  // ~512 KiB of rows
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
  for (i64 p = 0; p < P; ++p)
    for (i64 j = 0; j < kb; ++j) {
      const i64 k0 = 64 * j, w = std::min<i64>(64, K - k0);
      const float* Ap = A + p * T * Cd;
      const float* Bp = B + p * T * K + k0;
      float* Cp = C + p * Cd * K + k0;
      for (i64 t0 = 0; t0 < T; t0 += TC) {
        const i64 n = std::min(TC, T - t0);
        if (t0 == 0) block<false, true>(Ap, Cd, Bp, K, Cp, K, Cd, n, w);
        else block<true, true>(Ap + t0 * Cd, Cd, Bp + t0 * K, K, Cp, K, Cd, n, w);
      }
    }
}

// ---------------------------------------------------------------------------------------------------
// the fused layer: the four passes and the GEMMs band by band, in cache
// ---------------------------------------------------------------------------------------------------
// Unfused, a step writes and reads V, M, dM and dV: 16 values per 2x2 output tile, 4x the activation
// each, from and to DRAM.  With few channels there is too little arithmetic per value to hide that
// traffic (a 16-channel 32x32 layer ran at 1.8x F.conv2d).  Here a band of tile rows at a time goes
// through all the passes in buffers that stay in L2: the step reads x and dY and writes Y and dx,
// and V is not saved for the backward (4x the input's memory per layer) but computed again from x.
//
// dU = sum over tiles of V^T dM: every band adds its part into one of G = min(N, 16) partial sums,
// fixed by the band's images (not by the thread), summed in order at the end: the same bits at any
// thread count.  Bands never straddle groups, and a group's images are one thread's, so no two
// threads add into one pixel of dx.

// tile rows per band: its buffers (16 planes of `per_tile` values per tile) within ~512 KiB
inline i64 band_rows(i64 tw, i64 per_tile) {
  return std::max<i64>(1, (i64(1) << 17) / std::max<i64>(1, 16 * tw * per_tile));
}

template <bool RELU, bool BIAS, bool ORELU>
void fused_forward(const float* x, const float* U, float* y, i64 N, i64 H, i64 W, i64 C, i64 K, int nt,
                   const float* bias) {
  const i64 th = (H + 1) / 2, tw = (W + 1) / 2, R = N * th, br = band_rows(tw, C + K);
  const i64 bands = (R + br - 1) / br;
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> Vb(16 * br * tw * C), Mb(16 * br * tw * K), zeros(C, 0.0f);
#pragma omp for schedule(static)
    for (i64 b = 0; b < bands; ++b) {
      const i64 r0 = b * br, r1 = std::min(R, r0 + br), tb = (r1 - r0) * tw, pv = tb * C, pm = tb * K;
      for (i64 r = r0; r < r1; ++r)
        input_row<float, RELU>(x, Vb.data() + (r - r0) * tw * C, pv, r / th, r % th, H, W, C, zeros.data());
      for (i64 p = 0; p < 16; ++p)
        for (i64 k0 = 0; k0 < K; k0 += 64)
          block<false, false>(Vb.data() + p * pv, C, U + p * C * K + k0, K, Mb.data() + p * pm + k0, K, tb, C,
                              std::min<i64>(64, K - k0));
      for (i64 r = r0; r < r1; ++r)
        output_row<float, BIAS, ORELU>(Mb.data() + (r - r0) * tw * K, pm, y, r / th, r % th, H, W, K, bias);
    }
  }
}

// dx (N, H, W, C) and dU (16, C, K) of fused_forward; Ut: U transposed per position, (16, K, C).
template <bool RELU>
void fused_backward(const float* x, const float* gy, const float* Ut, float* dx, float* dU, i64 N, i64 H, i64 W,
                    i64 C, i64 K, bool need_x, bool need_u, int nt) {
  if (N == 0) {  // an empty batch: dx has no elements, dU is an empty sum
    if (need_u) std::fill(dU, dU + 16 * C * K, 0.0f);
    return;
  }
  const i64 th = (H + 1) / 2, tw = (W + 1) / 2, br = band_rows(tw, 2 * C + K), G = std::min<i64>(N, 16);
  std::vector<float> partial(need_u ? G * 16 * C * K : 0, 0.0f);
#pragma omp parallel num_threads(nt)
  {
    std::vector<float> Vb(16 * br * tw * C), dMb(16 * br * tw * K), dVb(need_x ? 16 * br * tw * C : 0);
    std::vector<float> zc(C, 0.0f), zk(K, 0.0f), sink(16 * C);
#pragma omp for schedule(dynamic, 1)  // (a group's results do not depend on the thread that computes it)
    for (i64 g = 0; g < G; ++g) {
      const i64 n0 = g * N / G, n1 = (g + 1) * N / G;
      float* part = need_u ? partial.data() + g * 16 * C * K : nullptr;
      if (need_x) std::fill(dx + n0 * H * W * C, dx + n1 * H * W * C, 0.0f);
      for (i64 r0 = n0 * th; r0 < n1 * th; r0 += br) {
        const i64 r1 = std::min(n1 * th, r0 + br), tb = (r1 - r0) * tw, pv = tb * C, pm = tb * K;
        for (i64 r = r0; r < r1; ++r) {
          input_row<float, RELU>(x, Vb.data() + (r - r0) * tw * C, pv, r / th, r % th, H, W, C, zc.data());
          output_adjoint_row(gy, dMb.data() + (r - r0) * tw * K, pm, r / th, r % th, H, W, K, zk.data());
        }
        if (need_u)
          for (i64 p = 0; p < 16; ++p)
            for (i64 k0 = 0; k0 < K; k0 += 64)
              block<true, true>(Vb.data() + p * pv, C, dMb.data() + p * pm + k0, K, part + p * C * K + k0, K, C, tb,
                                std::min<i64>(64, K - k0));
        if (need_x) {
          for (i64 p = 0; p < 16; ++p)
            for (i64 c0 = 0; c0 < C; c0 += 64)
              block<false, false>(dMb.data() + p * pm, K, Ut + p * K * C + c0, C, dVb.data() + p * pv + c0, C, tb, K,
                                  std::min<i64>(64, C - c0));
          for (i64 r = r0; r < r1; ++r)
            input_adjoint_row<float, RELU>(dVb.data() + (r - r0) * tw * C, Vb.data() + (r - r0) * tw * C, pv,
                                           dx + (r / th) * H * W * C, r % th, H, W, C, sink.data());
        }
      }
    }
  }
  if (need_u) {
    const i64 E = 16 * C * K;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (i64 e = 0; e < E; ++e) {
      float acc = partial[e];
      for (i64 g = 1; g < G; ++g) acc += partial[g * E + e];
      dU[e] = acc;
    }
  }
}
#else
#define ESDBS_HAS_GEMM 0
#endif

// ---------------------------------------------------------------------------------------------------
// the sparse layer: the 16 products on the nonzero weights only
// ---------------------------------------------------------------------------------------------------
// A pruned layer's U (16, C, K) keeps a fraction `density` of its entries.  The dense GEMMs above
// vectorise along the output channel and multiply every entry; here, as in XNNPACK's sparse
// inference (Elsen et al. 2020, "Fast Sparse ConvNets"), the products vectorise along the tiles: the
// transformed planes are held channel-major, V^T (C x tiles) and M^T (K x tiles) per position p, and
//
//   forward   M^T_p[k, t] = sum over the nonzeros (c, k) of column k of U_p:  U_p[c, k] V^T_p[c, t]
//   backward  dV^T_p[c, t] = sum over the nonzeros (c, k) of row c of U_p:    U_p[c, k] dM^T_p[k, t]
//             dU_p[c, k]  = sum_t V^T_p[c, t] dM^T_p[k, t], at the nonzeros only (zero elsewhere)
//
// so every multiply-add is one broadcast weight times 16 tiles; the backward's two products run in
// one pass over the nonzeros (each dM^T row loaded feeds both).  The mask's structure comes from
// esdbs_ray/winograd_sparse.py, built once per mask version, twice: by output channel for the
// forward, by input channel for the backward.  Per position p the nonzeros are stored segment-major:
// column segment j (SEG input -- or output -- channels), output row r (k, or c in the backward), the
// row's nonzeros in that segment by column; ptr holds their global starts, idx their columns, flat
// their index into U.  The products take a block of up to 128 tiles of the operand a segment at a time
// (64 in the backward's fused pass; 128 rows x 64 tiles is 32 KiB, L1; bands of 128 tiles or more, so
// blocks of 128, come only with few channels) while every output row adds its nonzeros of that
// segment, reading the structure front to back.  The values are U's at every call, gathered through `flat` in O(nnz).
// Positions without a nonzero are skipped.
//
// The layer runs band by band, as the fused dense layer does: a band is TB consecutive tiles (a
// multiple of 16, across tile rows and images) whose planes stay in L2.  Between the channels-last
// images and the channel-major planes: the input transform 16 tiles x 16 channels at a time (the
// channel-vectorised code above on each tile's 16 taps, then one 16 x 16 transpose per plane); the
// output transform tile-vectorised on M^T's rows, then only the four output pixels transposed (not
// the 16 planes); dM^T likewise from the four gradient pixels; the input adjoint from dV^T by 16 x 16
// blocks.  V, M, dM and dV never leave the caches; the layer reads x (and dY) and writes y (and dx),
// the next band's x prefetched while this band's products run.  The backward computes V again from x
// (what the autograd Function saves).
//
// Determinism: every output element is computed by one thread in one order.  Forward: bands are
// independent.  Backward: the batch is cut into G groups of images, fixed by N and nnz only (not by
// the thread count); a group is one thread's, its bands in order, so dx's overlap-adds run in one
// order, and dU's per-group partial sums are added in group order at the end.

// columns per segment of a row's nonzeros (see above)
constexpr i64 SEG = 128;

// Tiles per band.  The band's 16 planes (of `per_tile` channels per tile, rows padded by 16) within
// ~1 MiB, so that they stay in L2 on most CPUs: 256, 128 or 64 tiles (64: a full register block of
// the backward's fused products, half of the forward's); where even 64 tiles do not fit
// (C + K > ~200), 64.
inline i64 sparse_band_tiles(i64 per_tile, i64 elem) {
  const i64 budget = i64(1) << 20;
  for (i64 tb : {256, 128})
    if (16 * per_tile * (tb + 16) * elem <= budget) return tb;
  return 64;
}

// row stride of the band's channel-major planes: the band padded by 16 elements, so rows start on
// 64-byte boundaries and (an odd number of cache lines apart) spread over the L1 sets
inline i64 sparse_ld(i64 TB) { return TB + 16; }

// Groups of images in the backward, G a power of two up to 16 (2 and 4 threads share them out
// evenly): at most N, dU's partial sums (G x nnz) within ~16 MiB, and at least 48 tiles a group -- each
// band of a group walks all the nonzeros, so a band of a few tiles (2 x 2 images, 16 groups of a
// batch of 128: 8 tiles) pays the structure's traversal for a fraction of a vector (C = K = 128 at
// density 0.3, 2 threads: the backward's products 2.4 ms in 8-tile groups, 0.6 ms in 64-tile ones).
inline i64 sparse_groups(i64 N, i64 tiles, i64 nnz, i64 elem) {
  i64 G = 16;
  while (G > 1 && (G > N || G * std::max<i64>(1, nnz) * elem > (i64(16) << 20) || tiles < 48 * G)) G /= 2;
  return G;
}

// 64-byte aligned scratch (std::vector's 16-byte alignment made every 64-byte load of the products
// straddle two cache lines: half the speed)
template <typename T>
struct Aligned {
  T* p = nullptr;
  explicit Aligned(i64 n) {
    if (n > 0) {
      p = static_cast<T*>(std::aligned_alloc(64, (size_t(n) * sizeof(T) + 63) / 64 * 64));
      if (!p) throw std::bad_alloc();
    }
  }
  Aligned(const Aligned&) = delete;
  Aligned& operator=(const Aligned&) = delete;
  ~Aligned() { std::free(p); }
  T* data() const { return p; }
};

// Per-thread scratch that outlives the call (OpenMP's threads do): the bands' planes are megabytes,
// allocated once per thread and grown when a layer needs more, not allocated (and, under glibc's
// default mmap threshold, page-faulted) at every call.  Slot: one buffer per use within a call.
template <typename T>
T* thread_scratch(int slot, i64 n) {
  struct Buf {
    T* p = nullptr;
    i64 cap = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf bufs[10];
  Buf& b = bufs[slot];
  if (n > b.cap) {
    std::free(b.p);
    b.p = static_cast<T*>(std::aligned_alloc(64, (size_t(n) * sizeof(T) + 63) / 64 * 64));
    if (!b.p) {
      b.cap = 0;
      throw std::bad_alloc();
    }
    b.cap = n;
  }
  return b.p;
}
enum { SLOT_S, SLOT_VT, SLOT_MT, SLOT_DVT, SLOT_YB, SLOT_VALS, SLOT_RING, SLOT_LANE_A, SLOT_LANE_B, SLOT_ZROW };

// optional timing of the phases (bench/sparse_winograd.py's profile): seconds per phase, summed over
// threads, added into `out` (nullptr: no clock reads)
enum { PH_PACK, PH_IN, PH_TIN, PH_MUL, PH_TOUT, PH_OUT, PH_OADJ, PH_TDM, PH_DU, PH_DV, PH_TDV, PH_IADJ, PH_RED,
       PH_COUNT };
struct Prof {
#ifdef ESDBS_PROF_THREAD_CPU  // (development harnesses: the thread's CPU time, blind to other processes)
  static double now() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
  }
#else
  static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
#endif
  double* out;
  double acc[PH_COUNT] = {};
  double t = 0;
  explicit Prof(double* o) : out(o) {
    if (out) t = now();
  }
  void lap(int phase) {
    if (!out) return;
    const double u = now();
    acc[phase] += u - t;
    t = u;
  }
  void skip() {  // restart the clock without counting the time since the last lap
    if (out) t = now();
  }
  void flush() {
    if (!out) return;
    for (int i = 0; i < PH_COUNT; ++i) {
#pragma omp atomic
      out[i] += acc[i];
    }
  }
};

// One position's nonzeros, segment-major (see above): row r's nonzeros in segment j are
// begin(j, r) .. end(j, r), global indices, idx[e] their columns.  A segment's rows follow each other
// and segment j + 1 follows segment j: the position's nonzeros are begin(0, 0) .. end(S - 1, R - 1).
struct Rows {
  const int32_t* ptr;  // S (R + 1) pointers of this position
  const int32_t* idx;  // columns, indexed by global nonzero
  i64 R, S;
  i64 begin(i64 j, i64 r) const { return ptr[j * (R + 1) + r]; }
  i64 end(i64 j, i64 r) const { return ptr[j * (R + 1) + r + 1]; }
  i64 first() const { return ptr[0]; }
  i64 last() const { return ptr[(S - 1) * (R + 1) + R]; }
};

// dst[b * ldd + a] = src[a * lds + b] for a < rs, b < cs (a 16 x 16 block at most)
template <typename T>
inline void transpose16_generic(const T* __restrict src, i64 lds, int rs, int cs, T* __restrict dst, i64 ldd) {
  for (int b = 0; b < cs; ++b)
    for (int a = 0; a < rs; ++a) dst[b * ldd + a] = src[a * lds + b];
}

// the same with the destination rows at their own addresses: row b to drow[b] + off (none where
// drow[b] is null) ...
template <typename T>
inline void transpose16_to_generic(const T* __restrict src, i64 lds, int rs, int cs, T* const* drow, i64 off) {
  for (int b = 0; b < cs; ++b)
    if (drow[b])
      for (int a = 0; a < rs; ++a) drow[b][off + a] = src[a * lds + b];
}

// ... or the source rows: row a from srow[a] + off (zeros where srow[a] is null)
template <typename T>
inline void transpose16_from_generic(const T* const* srow, i64 off, int rs, int cs, T* __restrict dst, i64 ldd) {
  for (int b = 0; b < cs; ++b)
    for (int a = 0; a < rs; ++a) dst[b * ldd + a] = srow[a] ? srow[a][off + b] : T(0);
}

// Y[r][0 : nb] = sum over the nonzeros e of row r of vals[e] X[idx[e] ld + 0 : nb] (rows ld apart; nb
// a multiple of 16)
template <typename T>
void spmm_generic(const T* __restrict vals, const Rows& rows, const T* __restrict X, T* __restrict Y, i64 ld, i64 nb) {
  for (i64 r = 0; r < rows.R; ++r) std::fill(Y + r * ld, Y + r * ld + nb, T(0));
  for (i64 j = 0; j < rows.S; ++j)
    for (i64 r = 0; r < rows.R; ++r) {
      T* __restrict y = Y + r * ld;
      for (i64 e = rows.begin(j, r); e < rows.end(j, r); ++e) {
        const T w = vals[e];
        const T* __restrict x = X + rows.idx[e] * ld;
#pragma omp simd
        for (i64 t = 0; t < nb; ++t) y[t] += w * x[t];
      }
    }
}

// part[e] += sum_{t < nb} X[r ld + t] Z[idx[e] ld + t] for the nonzeros e of every row r
template <typename T>
void sddmm_generic(const Rows& rows, const T* __restrict X, const T* __restrict Z, i64 ld, i64 nb, T* __restrict part) {
  for (i64 j = 0; j < rows.S; ++j)
    for (i64 r = 0; r < rows.R; ++r) {
      const T* __restrict x = X + r * ld;
      for (i64 e = rows.begin(j, r); e < rows.end(j, r); ++e) {
        const T* __restrict z = Z + rows.idx[e] * ld;
        T s = T(0);
#pragma omp simd reduction(+ : s)
        for (i64 t = 0; t < nb; ++t) s += x[t] * z[t];
        part[e] += s;
      }
    }
}

#if ESDBS_HAS_GEMM
// AVX-512 float32 versions

// 16 x 16 in registers: unpack 32-bit, then 64-bit pairs, then 128-bit lanes twice (64 shuffles);
// r holds the rows, t gets the columns
inline void transpose16_core(__m512* r, __m512* t) {
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + m], 128-bit lane L: rows 4g .. 4g + 3 of column 4L + m
  for (int g = 0; g < 4; ++g) {
    const __m512d a0 = _mm512_castps_pd(t[4 * g]), a1 = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d a2 = _mm512_castps_pd(t[4 * g + 2]), a3 = _mm512_castps_pd(t[4 * g + 3]);
    r[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(a0, a2));
    r[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a0, a2));
    r[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(a1, a3));
    r[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(a1, a3));
  }
  // column 4L + m = lane L of u[m], u[4 + m], u[8 + m], u[12 + m]
  for (int m = 0; m < 4; ++m) {
    const __m512 ab0 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88), ab1 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
    const __m512 cd0 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    const __m512 cd1 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
    t[m] = _mm512_shuffle_f32x4(ab0, cd0, 0x88);       // column m
    t[8 + m] = _mm512_shuffle_f32x4(ab0, cd0, 0xDD);   // column 8 + m
    t[4 + m] = _mm512_shuffle_f32x4(ab1, cd1, 0x88);   // column 4 + m
    t[12 + m] = _mm512_shuffle_f32x4(ab1, cd1, 0xDD);  // column 12 + m
  }
}

inline __mmask16 lanes(int n) { return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1); }

inline void transpose16_f32(const float* __restrict src, i64 lds, int rs, int cs, float* __restrict dst, i64 ldd) {
  const __mmask16 cm = lanes(cs), rm = lanes(rs);
  __m512 r[16], t[16];
  for (int a = 0; a < 16; ++a) r[a] = a < rs ? _mm512_maskz_loadu_ps(cm, src + a * lds) : _mm512_setzero_ps();
  transpose16_core(r, t);
  for (int b = 0; b < cs; ++b) _mm512_mask_storeu_ps(dst + b * ldd, rm, t[b]);
}

inline void transpose16_to_f32(const float* __restrict src, i64 lds, int rs, int cs, float* const* drow, i64 off) {
  const __mmask16 cm = lanes(cs), rm = lanes(rs);
  __m512 r[16], t[16];
  for (int a = 0; a < 16; ++a) r[a] = a < rs ? _mm512_maskz_loadu_ps(cm, src + a * lds) : _mm512_setzero_ps();
  transpose16_core(r, t);
  for (int b = 0; b < cs; ++b)
    if (drow[b]) _mm512_mask_storeu_ps(drow[b] + off, rm, t[b]);
}

inline void transpose16_from_f32(const float* const* srow, i64 off, int rs, int cs, float* __restrict dst, i64 ldd) {
  const __mmask16 cm = lanes(cs);
  __m512 r[16], t[16];
  for (int a = 0; a < 16; ++a)
    r[a] = a < rs && srow[a] ? _mm512_maskz_loadu_ps(cm, srow[a] + off) : _mm512_setzero_ps();
  transpose16_core(r, t);
  for (int b = 0; b < cs; ++b) _mm512_store_ps(dst + b * ldd, t[b]);  // (all 16 lanes: dst is 16-aligned scratch)
}

// One block of 16 NV tiles (NV <= 8), one column segment j, every row: the row's block of Y in
// registers (loaded when ACC: a later segment), two sets of accumulators (even and odd nonzeros) for
// independent FMA chains, summed at the end.  A tile's sum runs in the same order whatever the
// block's width, so that the band and lane layouts (blocks cut differently) give the same bits.  Wide
// blocks spread what every row costs whatever its length -- its pointers, the stores, the loop's
// exit -- over more tiles: most of the work where rows are short (few input channels, or a low
// density).  (A later segment, ACC, with more than four vectors does not occur: more than SEG input
// channels and a band of 128 tiles or more do not go together.)
// The accumulators are arrays fully unrolled (GCC unroll), so they live in registers as named
// variables would.  Memory operands are 64-byte aligned.
template <int NV, bool ACC>
inline void spmm_block(const float* __restrict vals, const Rows& rows, i64 j, const float* __restrict X,
                       float* __restrict Y, i64 ld) {
  static_assert(NV >= 1 && NV <= 8, "16 accumulators at most");
  const int32_t* __restrict idx = rows.idx;
  for (i64 r = 0; r < rows.R; ++r) {
    i64 e = rows.begin(j, r);
    const i64 end = rows.end(j, r);
    if (ACC && e == end) continue;
    float* __restrict y = Y + r * ld;
    __m512 a[NV], b[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      a[v] = ACC ? _mm512_load_ps(y + 16 * v) : _mm512_setzero_ps();
      b[v] = _mm512_setzero_ps();
    }
    for (; e + 1 < end; e += 2) {
      const float* __restrict x = X + idx[e] * ld;
      const float* __restrict z = X + idx[e + 1] * ld;
      const __m512 w = _mm512_set1_ps(vals[e]), u = _mm512_set1_ps(vals[e + 1]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        a[v] = _mm512_fmadd_ps(w, _mm512_load_ps(x + 16 * v), a[v]);
        b[v] = _mm512_fmadd_ps(u, _mm512_load_ps(z + 16 * v), b[v]);
      }
    }
    if (e < end) {
      const float* __restrict x = X + idx[e] * ld;
      const __m512 w = _mm512_set1_ps(vals[e]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) a[v] = _mm512_fmadd_ps(w, _mm512_load_ps(x + 16 * v), a[v]);
    }
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) _mm512_store_ps(y + 16 * v, _mm512_add_ps(a[v], b[v]));
  }
}

template <int NV>
inline void spmm_segments(const float* vals, const Rows& rows, const float* X, float* Y, i64 ld) {
  spmm_block<NV, false>(vals, rows, 0, X, Y, ld);
  for (i64 j = 1; j < rows.S; ++j) spmm_block<NV, true>(vals, rows, j, X, Y, ld);
}

inline void spmm_f32(const float* vals, const Rows& rows, const float* X, float* Y, i64 ld, i64 nb) {
  for (i64 b0 = 0; b0 < nb; b0 += 128) {
    switch (std::min<i64>(8, (nb - b0) / 16)) {
      case 8: spmm_segments<8>(vals, rows, X + b0, Y + b0, ld); break;
      case 7: spmm_segments<7>(vals, rows, X + b0, Y + b0, ld); break;
      case 6: spmm_segments<6>(vals, rows, X + b0, Y + b0, ld); break;
      case 5: spmm_segments<5>(vals, rows, X + b0, Y + b0, ld); break;
      case 4: spmm_segments<4>(vals, rows, X + b0, Y + b0, ld); break;
      case 3: spmm_segments<3>(vals, rows, X + b0, Y + b0, ld); break;
      case 2: spmm_segments<2>(vals, rows, X + b0, Y + b0, ld); break;
      default: spmm_segments<1>(vals, rows, X + b0, Y + b0, ld); break;
    }
  }
}

// the 16 sums of a[0 .. 15]'s lanes, lane i the sum of a[i]: halves, quarters, pairs, then single
// lanes of two vectors at a time (45 shuffles and adds), a last permute puts them in order
inline __m512 hsum16(const __m512* a) {
  __m512 b[8], c[4], d[2];
  for (int i = 0; i < 8; ++i)  // lanes 0-7: a[2i]'s two 256-bit halves summed, lanes 8-15: a[2i + 1]'s
    b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)  // 128-bit lane j: a[4i + j]'s four 128-bit lanes summed
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i) {  // lane j: (a[8i + j] in two lanes, a[8i + 4 + j] in two lanes)
    const __m512d x = _mm512_castps_pd(c[2 * i]), y = _mm512_castps_pd(c[2 * i + 1]);
    d[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  // 128-bit lane j, element m: the sum of a[4m + j]
  const __m512 f = _mm512_add_ps(_mm512_shuffle_ps(d[0], d[1], 0x88), _mm512_shuffle_ps(d[0], d[1], 0xDD));
  const __m512i order = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(order, f);
}

// dU's dot products over one chunk of 16 NV <= 128 tiles: per segment, row r's NV vectors stay in
// registers while its nonzeros in the segment stream their rows of Z.  The nonzeros come in their
// storage order, so each one's 16 lane sums wait in `pend` until 16 consecutive ones are there, then
// one hsum16 adds them to part[e0 .. e0 + 16).  Every nonzero's partial sum gets this chunk's term
// once, in chunk order.
template <int NV>
void sddmm_chunk(const Rows& rows, const float* __restrict X, const float* __restrict Z, i64 ld,
                 float* __restrict part) {
  alignas(64) __m512 pend[16];
  const int32_t* __restrict idx = rows.idx;
  int cnt = 0;
  i64 e0 = rows.first();
  for (i64 j = 0; j < rows.S; ++j)
    for (i64 r = 0; r < rows.R; ++r) {
      const i64 b = rows.begin(j, r), end = rows.end(j, r);
      if (b == end) continue;
      const float* __restrict x = X + r * ld;
      const __m512 x0 = _mm512_load_ps(x);
      const __m512 x1 = NV > 1 ? _mm512_load_ps(x + 16) : x0, x2 = NV > 2 ? _mm512_load_ps(x + 32) : x0;
      const __m512 x3 = NV > 3 ? _mm512_load_ps(x + 48) : x0, x4 = NV > 4 ? _mm512_load_ps(x + 64) : x0;
      const __m512 x5 = NV > 5 ? _mm512_load_ps(x + 80) : x0, x6 = NV > 6 ? _mm512_load_ps(x + 96) : x0;
      const __m512 x7 = NV > 7 ? _mm512_load_ps(x + 112) : x0;
      for (i64 e = b; e < end; ++e) {
        const float* __restrict z = Z + idx[e] * ld;
        __m512 s0 = _mm512_mul_ps(x0, _mm512_load_ps(z));
        __m512 s1 = NV > 1 ? _mm512_mul_ps(x1, _mm512_load_ps(z + 16)) : _mm512_setzero_ps();
        if constexpr (NV > 2) s0 = _mm512_fmadd_ps(x2, _mm512_load_ps(z + 32), s0);
        if constexpr (NV > 3) s1 = _mm512_fmadd_ps(x3, _mm512_load_ps(z + 48), s1);
        if constexpr (NV > 4) s0 = _mm512_fmadd_ps(x4, _mm512_load_ps(z + 64), s0);
        if constexpr (NV > 5) s1 = _mm512_fmadd_ps(x5, _mm512_load_ps(z + 80), s1);
        if constexpr (NV > 6) s0 = _mm512_fmadd_ps(x6, _mm512_load_ps(z + 96), s0);
        if constexpr (NV > 7) s1 = _mm512_fmadd_ps(x7, _mm512_load_ps(z + 112), s1);
        pend[cnt++] = _mm512_add_ps(s0, s1);
        if (cnt == 16) {
          _mm512_storeu_ps(part + e0, _mm512_add_ps(_mm512_loadu_ps(part + e0), hsum16(pend)));
          e0 += 16;
          cnt = 0;
        }
      }
    }
  if (cnt) {
    for (int i = cnt; i < 16; ++i) pend[i] = _mm512_setzero_ps();
    const __mmask16 m = (__mmask16)((1u << cnt) - 1);
    _mm512_mask_storeu_ps(part + e0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, part + e0), hsum16(pend)));
  }
}

inline void sddmm_f32(const Rows& rows, const float* X, const float* Z, i64 ld, i64 nb, float* part) {
  for (i64 b0 = 0; b0 < nb; b0 += 128) {
    switch (std::min<i64>(8, (nb - b0) / 16)) {
      case 8: sddmm_chunk<8>(rows, X + b0, Z + b0, ld, part); break;
      case 7: sddmm_chunk<7>(rows, X + b0, Z + b0, ld, part); break;
      case 6: sddmm_chunk<6>(rows, X + b0, Z + b0, ld, part); break;
      case 5: sddmm_chunk<5>(rows, X + b0, Z + b0, ld, part); break;
      case 4: sddmm_chunk<4>(rows, X + b0, Z + b0, ld, part); break;
      case 3: sddmm_chunk<3>(rows, X + b0, Z + b0, ld, part); break;
      case 2: sddmm_chunk<2>(rows, X + b0, Z + b0, ld, part); break;
      default: sddmm_chunk<1>(rows, X + b0, Z + b0, ld, part); break;
    }
  }
}
// The backward's two products in one pass over the nonzeros (each row c of the structure by input
// channel, each of its nonzeros (c, k) in the segment): the dM^T rows a nonzero loads feed both
// dV^T[c] += U[c, k] dM^T[k] (the row's block of dV^T in registers, stored -- masked by the ReLU,
// V^T[c] <= 0 -- at the row's end) and dU's dot product V^T[c] . dM^T[k] (V^T[c] in registers,
// the 16 lane sums to `pend` as sddmm_chunk does): two multiply-adds per vector loaded instead of
// one.  One block of 16 NV tiles, one segment j; ACC: add to dV^T's block (a later segment).
template <int NV, bool ACC, bool RELU>
inline void backward_block(const float* __restrict vals, const Rows& rows, i64 j, const float* __restrict VT,
                           const float* __restrict dMT, float* __restrict dVT, i64 ld, float* __restrict part,
                           __m512* pend, int& cnt, i64& e0) {
  const int32_t* __restrict idx = rows.idx;
  const __m512 zero = _mm512_setzero_ps();
  for (i64 r = 0; r < rows.R; ++r) {
    const i64 b = rows.begin(j, r), end = rows.end(j, r);
    if (ACC && b == end) continue;
    const float* __restrict x = VT + r * ld;
    float* __restrict y = dVT + r * ld;
    const __m512 x0 = _mm512_load_ps(x);
    const __m512 x1 = NV > 1 ? _mm512_load_ps(x + 16) : zero, x2 = NV > 2 ? _mm512_load_ps(x + 32) : zero;
    const __m512 x3 = NV > 3 ? _mm512_load_ps(x + 48) : zero;
    __m512 a0 = ACC ? _mm512_load_ps(y) : zero, a1 = ACC && NV > 1 ? _mm512_load_ps(y + 16) : zero;
    __m512 a2 = ACC && NV > 2 ? _mm512_load_ps(y + 32) : zero, a3 = ACC && NV > 3 ? _mm512_load_ps(y + 48) : zero;
    for (i64 e = b; e < end; ++e) {
      const float* __restrict z = dMT + idx[e] * ld;
      const __m512 w = _mm512_set1_ps(vals[e]);
      const __m512 z0 = _mm512_load_ps(z);
      a0 = _mm512_fmadd_ps(w, z0, a0);
      __m512 s0 = _mm512_mul_ps(x0, z0), s1 = zero;
      if constexpr (NV > 1) {
        const __m512 z1 = _mm512_load_ps(z + 16);
        a1 = _mm512_fmadd_ps(w, z1, a1);
        s1 = _mm512_mul_ps(x1, z1);
      }
      if constexpr (NV > 2) {
        const __m512 z2 = _mm512_load_ps(z + 32);
        a2 = _mm512_fmadd_ps(w, z2, a2);
        s0 = _mm512_fmadd_ps(x2, z2, s0);
      }
      if constexpr (NV > 3) {
        const __m512 z3 = _mm512_load_ps(z + 48);
        a3 = _mm512_fmadd_ps(w, z3, a3);
        s1 = _mm512_fmadd_ps(x3, z3, s1);
      }
      pend[cnt++] = _mm512_add_ps(s0, s1);
      if (cnt == 16) {
        _mm512_storeu_ps(part + e0, _mm512_add_ps(_mm512_loadu_ps(part + e0), hsum16(pend)));
        e0 += 16;
        cnt = 0;
      }
    }
    // the ReLU's gradient mask, on every segment's part (the sum of masked parts is the masked sum)
#define ESDBS_ST(v, acc, xv)                                                                          \
    if constexpr (NV > v) {                                                                          \
      const __m512 o = RELU ? _mm512_mask_mov_ps(acc, _mm512_cmp_ps_mask(xv, zero, _CMP_LE_OQ), zero) : acc; \
      _mm512_store_ps(y + 16 * v, o);                                                                \
    }
    ESDBS_ST(0, a0, x0) ESDBS_ST(1, a1, x1) ESDBS_ST(2, a2, x2) ESDBS_ST(3, a3, x3)
#undef ESDBS_ST
  }
}

template <int NV, bool RELU>
inline void backward_segments(const float* vals, const Rows& rows, const float* VT, const float* dMT, float* dVT,
                              i64 ld, float* part) {
  alignas(64) __m512 pend[16];
  int cnt = 0;
  i64 e0 = rows.first();
  backward_block<NV, false, RELU>(vals, rows, 0, VT, dMT, dVT, ld, part, pend, cnt, e0);
  for (i64 j = 1; j < rows.S; ++j) backward_block<NV, true, RELU>(vals, rows, j, VT, dMT, dVT, ld, part, pend, cnt, e0);
  if (cnt) {
    for (int i = cnt; i < 16; ++i) pend[i] = _mm512_setzero_ps();
    const __mmask16 m = (__mmask16)((1u << cnt) - 1);
    _mm512_mask_storeu_ps(part + e0, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, part + e0), hsum16(pend)));
  }
}

template <bool RELU>
inline void backward_products_f32(const float* vals, const Rows& rows, const float* VT, const float* dMT, float* dVT,
                                  i64 ld, i64 nb, float* part) {
  for (i64 b0 = 0; b0 < nb; b0 += 64) {
    switch (std::min<i64>(4, (nb - b0) / 16)) {
      case 4: backward_segments<4, RELU>(vals, rows, VT + b0, dMT + b0, dVT + b0, ld, part); break;
      case 3: backward_segments<3, RELU>(vals, rows, VT + b0, dMT + b0, dVT + b0, ld, part); break;
      case 2: backward_segments<2, RELU>(vals, rows, VT + b0, dMT + b0, dVT + b0, ld, part); break;
      default: backward_segments<1, RELU>(vals, rows, VT + b0, dMT + b0, dVT + b0, ld, part); break;
    }
  }
}
#endif  // ESDBS_HAS_GEMM

// dV^T = U dM^T masked by the ReLU (V^T <= 0: 0) and part += dU's dot products, both over one
// plane's band: fused where the AVX-512 kernels are, else the two products one after the other
template <typename T, bool RELU>
inline void backward_products(const T* vals, const Rows& rows, const T* VT, const T* dMT, T* dVT, i64 ld, i64 nb,
                              T* part);

// the three, by element type: the AVX-512 kernels for float32 where compiled, else the portable loops
template <typename T>
inline void transpose16(const T* src, i64 lds, int rs, int cs, T* dst, i64 ldd) {
#if ESDBS_HAS_GEMM
  if constexpr (std::is_same<T, float>::value) transpose16_f32(src, lds, rs, cs, dst, ldd);
  else
#endif
    transpose16_generic(src, lds, rs, cs, dst, ldd);
}

template <typename T>
inline void transpose16_to(const T* src, i64 lds, int rs, int cs, T* const* drow, i64 off) {
#if ESDBS_HAS_GEMM
  if constexpr (std::is_same<T, float>::value) transpose16_to_f32(src, lds, rs, cs, drow, off);
  else
#endif
    transpose16_to_generic(src, lds, rs, cs, drow, off);
}

template <typename T>
inline void transpose16_from(const T* const* srow, i64 off, int rs, int cs, T* dst, i64 ldd) {
#if ESDBS_HAS_GEMM
  if constexpr (std::is_same<T, float>::value) transpose16_from_f32(srow, off, rs, cs, dst, ldd);
  else
#endif
    transpose16_from_generic(srow, off, rs, cs, dst, ldd);
}

template <typename T>
inline void spmm(const T* vals, const Rows& rows, const T* X, T* Y, i64 ld, i64 nb) {
#if ESDBS_HAS_GEMM
  if constexpr (std::is_same<T, float>::value) spmm_f32(vals, rows, X, Y, ld, nb);
  else
#endif
    spmm_generic(vals, rows, X, Y, ld, nb);
}

template <typename T>
inline void sddmm(const Rows& rows, const T* X, const T* Z, i64 ld, i64 nb, T* part) {
#if ESDBS_HAS_GEMM
  if constexpr (std::is_same<T, float>::value) sddmm_f32(rows, X, Z, ld, nb, part);
  else
#endif
    sddmm_generic(rows, X, Z, ld, nb, part);
}

// the ReLU's gradient mask on a block of rows: y = 0 where ref <= 0 (as mask<> above)
template <typename T>
inline void relu_mask(T* __restrict Y, const T* __restrict ref, i64 R, i64 ld, i64 nb) {
  for (i64 r = 0; r < R; ++r) {
    T* __restrict y = Y + r * ld;
    const T* __restrict m = ref + r * ld;
#pragma omp simd
    for (i64 t = 0; t < nb; ++t) y[t] = m[t] <= T(0) ? T(0) : y[t];
  }
}

template <typename T, bool RELU>
inline void backward_products(const T* vals, const Rows& rows, const T* VT, const T* dMT, T* dVT, i64 ld, i64 nb,
                              T* part) {
#if ESDBS_HAS_GEMM
  if constexpr (std::is_same<T, float>::value) {
    backward_products_f32<RELU>(vals, rows, VT, dMT, dVT, ld, nb, part);
    return;
  }
#endif
  sddmm(rows, VT, dMT, ld, nb, part);
  spmm(vals, rows, dMT, dVT, ld, nb);
  if (RELU) relu_mask(dVT, VT, rows.R, ld, nb);
}

// this call's values of the nonzeros: vals[e] = U[flat[e]], shared by the team that calls it.  By
// output channel the storage order walks U's rows a K-stride apart, which no hardware prefetcher
// follows: the address PF nonzeros ahead is prefetched (C = K = 512 at 20 %: 4.4 ns a nonzero
// without, ~2.5 with -- about one read of U).
// Where the structure is small each thread gathers its own copy (PRIVATE_GATHER values at most): no
// barrier after it, so a thread that starts late -- the cores busy with other processes, as on the
// project's shared 2-core machines -- holds no one up; else the team shares one copy (`omp for`,
// then a barrier).
constexpr i64 PRIVATE_GATHER = i64(1) << 20;
template <typename T>
void gather(const T* __restrict U, const int32_t* __restrict flat, i64 nnz, T* __restrict vals, bool team) {
  constexpr i64 PF = 256;
  if (!team) {
    for (i64 e = 0; e < nnz; ++e) {
      if (e + PF < nnz) __builtin_prefetch(U + flat[e + PF]);
      vals[e] = U[flat[e]];
    }
    return;
  }
#pragma omp for schedule(static)
  for (i64 e = 0; e < nnz; ++e) {
    if (e + PF < nnz) __builtin_prefetch(U + flat[e + PF]);
    vals[e] = U[flat[e]];
  }
}

// this thread's copy of the values, or the team's (see gather)
template <typename T>
const T* team_values(const T* U, const int32_t* flat, i64 nnz, T* shared) {
  if (nnz <= PRIVATE_GATHER) {
    T* v = thread_scratch<T>(SLOT_VALS, std::max<i64>(1, nnz));
    gather(U, flat, nnz, v, false);
    return v;
  }
  gather(U, flat, nnz, shared, true);  // (the omp for's barrier: all of it there)
  return shared;
}

// tile t of the batch -> image n, tile row i, tile column j; next(): tile t + 1 (no divisions)
struct TileAt {
  i64 n, i, j, th, tw;
  TileAt(i64 t, i64 th_, i64 tw_) : n(t / (th_ * tw_)), i(t / tw_ % th_), j(t % tw_), th(th_), tw(tw_) {}
  void next() {
    if (++j == tw) {
      j = 0;
      if (++i == th) {
        i = 0;
        ++n;
      }
    }
  }
};

// The band's input transform: tiles t0 .. t0 + nb (nb <= TB) to the channel-major planes VT (16 x C
// rows, ld apart) of the positions in `live`.  16 tiles at a time: their 16 taps each found once,
// then 16 channels at a time the transform into S (16 planes x 16 tiles x 16 channels, 16 KiB: L1)
// and one 16 x 16 transpose per plane into VT.  A band's columns past nb up to the next multiple of
// 16 are 0 (tiles past nb read the zero row).
template <typename T, bool RELU>
void band_input(const T* x, T* S, T* VT, i64 ld, i64 t0, i64 nb, i64 th, i64 tw, i64 H, i64 W, i64 C,
                const bool* live, const T* zc, Prof& prof) {
  TileAt a(t0, th, tw);
  for (i64 q = 0; q < nb; q += 16) {
    const i64 cnt = std::min<i64>(16, nb - q);
    const T* taps[16][16];
    for (i64 l = 0; l < 16; ++l, a.next()) {
      if (l >= cnt) {
        for (int k = 0; k < 16; ++k) taps[l][k] = zc;
        continue;
      }
      const T* row[4];
      bool rin[4];
      input_rows(x, a.n, a.i, H, W, C, row, rin);
      for (int r = 0; r < 4; ++r)
        for (int b = 0; b < 4; ++b) {
          const i64 w = 2 * a.j + b - 1;
          taps[l][4 * r + b] = rin[r] && w >= 0 && w < W ? row[r] + w * C : zc;
        }
    }
    for (i64 c0 = 0; c0 < C; c0 += 16) {
      const i64 nc = std::min<i64>(16, C - c0);
      for (i64 l = 0; l < 16; ++l) input_taps<T, RELU>(taps[l], c0, nc, S + l * 16, 256);
      prof.lap(PH_IN);
      for (i64 p = 0; p < 16; ++p)
        if (live[p]) transpose16(S + p * 256, 16, 16, int(nc), VT + (p * C + c0) * ld + q, ld);
      prof.lap(PH_TIN);
    }
  }
}

// Tile l's output pixel (a, b), for each of the band's tiles: drow[(2a + b) TB + l] (null outside the
// image)
template <typename T>
void output_rows(T* y, T** drow, i64 TB, i64 t0, i64 nb, i64 th, i64 tw, i64 H, i64 W, i64 K) {
  TileAt a(t0, th, tw);
  for (i64 l = 0; l < nb; ++l, a.next()) {
    const bool h1 = 2 * a.i + 1 < H, w1 = 2 * a.j + 1 < W;
    T* o = y + ((a.n * H + 2 * a.i) * W + 2 * a.j) * K;
    drow[l] = o;
    drow[TB + l] = w1 ? o + K : nullptr;
    drow[2 * TB + l] = h1 ? o + W * K : nullptr;
    drow[3 * TB + l] = h1 && w1 ? o + W * K + K : nullptr;
  }
}

// The band's output transform, tile-vectorised: Y = A^T M A straight from M^T's rows, each of the 16
// plane rows of an output channel streamed along the band's columns into Yb (four output pixels x K
// channels x the band, 4 K ld scratch), with the inference epilogue (output_tile's); then only those
// four pixels -- not the 16 planes -- are transposed into the channels-last image (band_scatter,
// lane_scatter).
template <typename T, bool BIAS, bool ORELU>
void band_pixels(const T* MT, i64 ld, i64 nbp, i64 K, T* Yb, const T* bias) {
  const i64 ps = K * ld, ys = K * ld;
  for (i64 k = 0; k < K; ++k) {
    const T* __restrict m = MT + k * ld;
    T* __restrict o = Yb + k * ld;
    const T bk = BIAS ? bias[k] : T(0);
#pragma omp simd
    for (i64 l = 0; l < nbp; ++l) {
      T t[4][2];  // t[p][b]: A^T along the columns of M's row p
      for (int p = 0; p < 4; ++p) {
        const T m0 = m[(4 * p + 0) * ps + l], m1 = m[(4 * p + 1) * ps + l];
        const T m2 = m[(4 * p + 2) * ps + l], m3 = m[(4 * p + 3) * ps + l];
        t[p][0] = m0 + m1 + m2;
        t[p][1] = m1 - m2 - m3;
      }
      T v0 = t[0][0] + t[1][0] + t[2][0], v1 = t[0][1] + t[1][1] + t[2][1];
      T v2 = t[1][0] - t[2][0] - t[3][0], v3 = t[1][1] - t[2][1] - t[3][1];
      if (BIAS) {
        v0 += bk; v1 += bk; v2 += bk; v3 += bk;
      }
      o[0 * ys + l] = clip<ORELU>(v0);
      o[1 * ys + l] = clip<ORELU>(v1);
      o[2 * ys + l] = clip<ORELU>(v2);
      o[3 * ys + l] = clip<ORELU>(v3);
    }
  }
}

template <typename T>
void band_pixels(const T* MT, i64 ld, i64 nbp, i64 K, T* Yb, const T* bias, bool orelu) {
  with_epilogue(bias != nullptr, orelu, [&](auto B, auto R) {
    band_pixels<T, decltype(B)::value, decltype(R)::value>(MT, ld, nbp, K, Yb, bias);
  });
}

// Yb's four pixels of the band's tiles t0 .. t0 + nb into the image (drow: 4 TB row pointers)
template <typename T>
void band_scatter(const T* Yb, i64 ld, i64 TB, i64 t0, i64 nb, i64 th, i64 tw, i64 H, i64 W, i64 K, T* y,
                  T** drow) {
  const i64 ys = K * ld;
  output_rows(y, drow, TB, t0, nb, th, tw, H, W, K);
  for (i64 q = 0; q < nb; q += 16) {
    const int cnt = int(std::min<i64>(16, nb - q));
    for (int ab = 0; ab < 4; ++ab)
      for (i64 k0 = 0; k0 < K; k0 += 16)
        transpose16_to(Yb + ab * ys + k0 * ld + q, ld, int(std::min<i64>(16, K - k0)), cnt, drow + ab * TB + q, k0);
  }
}

// ---------------------------------------------------------------------------------------------------
// the forward's lane layout: 16 images side by side
// ---------------------------------------------------------------------------------------------------
// In the band layout above the 16 lanes of a vector are 16 consecutive tiles, so the input transform
// computes each tile's 16 planes channel-vectorised and transposes every plane (16 16 x 16 transposes
// per 16 tiles and 16 channels: as much time as the transform itself).  The forward of a whole group
// of 16 images instead puts image l of the group in lane l: column 16 s + l of a band is tile
// position s (= i tw + j) of image n0 + l.  The input is transposed once per pixel -- each input row
// of the 16 images to `(W + 3) x C x 16` (the lanes innermost, zero-padded columns), in a ring of
// rows -- and the transform is then lane-parallel arithmetic on whole vectors: a quarter of the
// transposes (4 pixels per tile instead of 16 planes), no shuffles in the transform.  The products and
// the output transform are the band layout's; only the final pixel transposes address 16 images.  A
// batch's last N mod 16 images take the band layout.  The same arithmetic in the same order as the
// band layout: the same bits.
struct LaneRing {
  i64 rb, wp, c;  // slots, padded width (2 tw + 2 columns: tap columns -1 .. 2 tw), channels
  i64 slot() const { return wp * c * 16; }
};

// rows of input a band of tile positions [s0, s1) reads: 2 i0 - 1 .. 2 i1 + 2; slots so that the
// rows of the next band never overwrite rows this one still reads
inline i64 lane_ring_rows(i64 P, i64 tw) { return 2 * ((P + tw - 2) / tw) + 6; }

// input row r of images n0 .. n0 + 15 into its ring slot (columns 1 .. W; the padding stays 0)
template <typename T>
void lane_row(const T* x, i64 n0, i64 r, i64 H, i64 W, i64 C, const LaneRing& ring, T* buf) {
  T* slot = buf + (r % ring.rb) * ring.slot();
  const T* srow[16];
  for (int l = 0; l < 16; ++l) srow[l] = x + ((n0 + l) * H + r) * W * C;
  for (i64 w = 0; w < W; ++w) {
    T* dst = slot + (w + 1) * C * 16;
    for (i64 c0 = 0; c0 < C; c0 += 16) transpose16_from(srow, c0, 16, int(std::min<i64>(16, C - c0)), dst + c0 * 16, 16);
    for (int l = 0; l < 16; ++l) srow[l] += C;
  }
}

// The band's input transform in the lane layout: positions s0 .. s1 of the group to VT (16 x C rows,
// ld apart; column 16 (s - s0) + l).  input_taps' arithmetic, lane-parallel.
template <typename T, bool RELU>
void lane_input(const T* buf, const T* zrow, const LaneRing& ring, T* VT, i64 ld, i64 s0, i64 s1, i64 tw, i64 H,
                i64 C) {
  const i64 ps = C * ld;
  for (i64 s = s0; s < s1; ++s) {
    const i64 i = s / tw, j = s % tw;
    const T* rp[4];
    for (int a = 0; a < 4; ++a) {
      const i64 h = 2 * i + a - 1;
      rp[a] = (h >= 0 && h < H ? buf + (h % ring.rb) * ring.slot() : zrow) + 2 * j * C * 16;
    }
    T* __restrict out0 = VT + 16 * (s - s0);
    for (i64 c = 0; c < C; ++c) {
      const T *__restrict d00 = rp[0] + c * 16, *__restrict d01 = d00 + C * 16, *__restrict d02 = d00 + 2 * C * 16,
              *__restrict d03 = d00 + 3 * C * 16;
      const T *__restrict d10 = rp[1] + c * 16, *__restrict d11 = d10 + C * 16, *__restrict d12 = d10 + 2 * C * 16,
              *__restrict d13 = d10 + 3 * C * 16;
      const T *__restrict d20 = rp[2] + c * 16, *__restrict d21 = d20 + C * 16, *__restrict d22 = d20 + 2 * C * 16,
              *__restrict d23 = d20 + 3 * C * 16;
      const T *__restrict d30 = rp[3] + c * 16, *__restrict d31 = d30 + C * 16, *__restrict d32 = d30 + 2 * C * 16,
              *__restrict d33 = d30 + 3 * C * 16;
      T* __restrict o = out0 + c * ld;
      // every plane stored, the dead positions' too (rows the products do not read): no branch per plane
#pragma omp simd
      for (int l = 0; l < 16; ++l) {
        const T r00 = d00[l] - d02[l], r01 = d01[l] + d02[l], r02 = d02[l] - d01[l], r03 = d01[l] - d03[l];
        const T r10 = d10[l] - d12[l], r11 = d11[l] + d12[l], r12 = d12[l] - d11[l], r13 = d11[l] - d13[l];
        const T r20 = d20[l] - d22[l], r21 = d21[l] + d22[l], r22 = d22[l] - d21[l], r23 = d21[l] - d23[l];
        const T r30 = d30[l] - d32[l], r31 = d31[l] + d32[l], r32 = d32[l] - d31[l], r33 = d31[l] - d33[l];
        o[0 * ps + l] = clip<RELU>(r00 - r20); o[1 * ps + l] = clip<RELU>(r01 - r21);
        o[2 * ps + l] = clip<RELU>(r02 - r22); o[3 * ps + l] = clip<RELU>(r03 - r23);
        o[4 * ps + l] = clip<RELU>(r10 + r20); o[5 * ps + l] = clip<RELU>(r11 + r21);
        o[6 * ps + l] = clip<RELU>(r12 + r22); o[7 * ps + l] = clip<RELU>(r13 + r23);
        o[8 * ps + l] = clip<RELU>(r20 - r10); o[9 * ps + l] = clip<RELU>(r21 - r11);
        o[10 * ps + l] = clip<RELU>(r22 - r12); o[11 * ps + l] = clip<RELU>(r23 - r13);
        o[12 * ps + l] = clip<RELU>(r10 - r30); o[13 * ps + l] = clip<RELU>(r11 - r31);
        o[14 * ps + l] = clip<RELU>(r12 - r32); o[15 * ps + l] = clip<RELU>(r13 - r33);
      }
    }
  }
}

// Yb's four pixels of the group's positions s0 .. s1 into images n0 .. n0 + 15
template <typename T>
void lane_scatter(const T* Yb, i64 ld, i64 n0, i64 s0, i64 s1, i64 tw, i64 H, i64 W, i64 K, T* y) {
  const i64 ys = K * ld;
  T* drow[16];
  for (i64 s = s0; s < s1; ++s) {
    const i64 i = s / tw, j = s % tw;
    for (int ab = 0; ab < 4; ++ab) {
      const i64 h = 2 * i + ab / 2, w = 2 * j + ab % 2;
      if (h >= H || w >= W) continue;
      for (int l = 0; l < 16; ++l) drow[l] = y + (((n0 + l) * H + h) * W + w) * K;
      const T* src = Yb + ab * ys + 16 * (s - s0);
      for (i64 k0 = 0; k0 < K; k0 += 16) transpose16_to(src + k0 * ld, ld, int(std::min<i64>(16, K - k0)), 16, drow, k0);
    }
  }
}

// The band's dM^T = (A dY A^T)^T: the four gradient pixels of 16 tiles transposed from the image (zero
// outside it), then the 16 planes, tile-vectorised, into dMT (K rows per plane, ld apart); the
// band's columns past nb up to the next multiple of 16 are 0.  Gb: 4 x 16 x 16 scratch.
template <typename T>
void band_output_adjoint(const T* gy, T* dMT, i64 ld, i64 t0, i64 nb, i64 th, i64 tw, i64 H, i64 W, i64 K, T* Gb) {
  const i64 ps = K * ld;
  TileAt a(t0, th, tw);
  for (i64 q = 0; q < nb; q += 16) {
    const i64 cnt = std::min<i64>(16, nb - q);
    const T* srow[4][16];
    for (i64 l = 0; l < 16; ++l, a.next()) {
      if (l >= cnt) {
        for (int ab = 0; ab < 4; ++ab) srow[ab][l] = nullptr;
        continue;
      }
      const bool h1 = 2 * a.i + 1 < H, w1 = 2 * a.j + 1 < W;
      const T* g = gy + ((a.n * H + 2 * a.i) * W + 2 * a.j) * K;
      srow[0][l] = g;
      srow[1][l] = w1 ? g + K : nullptr;
      srow[2][l] = h1 ? g + W * K : nullptr;
      srow[3][l] = h1 && w1 ? g + W * K + K : nullptr;
    }
    for (i64 k0 = 0; k0 < K; k0 += 16) {
      const int kk = int(std::min<i64>(16, K - k0));
      for (int ab = 0; ab < 4; ++ab) transpose16_from(srow[ab], k0, 16, kk, Gb + ab * 256, 16);
      for (int kr = 0; kr < kk; ++kr) {
        const T* __restrict g = Gb + kr * 16;
        T* __restrict out = dMT + (k0 + kr) * ld + q;
#pragma omp simd
        for (int l = 0; l < 16; ++l) {
          // A = (A^T)^T sends (g0, g1) to (g0, g0 + g1, g0 - g1, -g1), along columns, then rows
          const T a0 = g[l], a1 = g[256 + l], b0 = g[512 + l], b1 = g[768 + l];
          const T s0[4] = {a0, a0 + a1, a0 - a1, -a1};
          const T s1[4] = {b0, b0 + b1, b0 - b1, -b1};
          for (int c = 0; c < 4; ++c) {
            out[(0 + c) * ps + l] = s0[c];
            out[(4 + c) * ps + l] = s0[c] + s1[c];
            out[(8 + c) * ps + l] = s0[c] - s1[c];
            out[(12 + c) * ps + l] = -s1[c];
          }
        }
      }
    }
  }
}

// The image memory a band of tiles reads (x, C channels) or writes (y, K channels): one contiguous
// range of the NHWC tensor, from the first tile row's top input row to the last one's bottom row.
struct Span {
  const char* p = nullptr;
  i64 bytes = 0;
};
template <typename T>
inline Span band_span(const T* img, i64 t0, i64 nb, i64 th, i64 tw, i64 H, i64 W, i64 ch, bool input) {
  if (nb <= 0) return {};
  const TileAt a(t0, th, tw), b(t0 + nb - 1, th, tw);
  const i64 h0 = std::max<i64>(0, 2 * a.i - (input ? 1 : 0)), h1 = std::min<i64>(H, 2 * b.i + (input ? 3 : 2));
  const i64 first = (a.n * H + h0) * W * ch, last = (b.n * H + h1) * W * ch;
  return {reinterpret_cast<const char*>(img + first), (last - first) * i64(sizeof(T))};
}

// Part `part` of `parts` of a span brought towards the core (into L2) while other work runs: the next
// band's input read, and its output lines owned for writing, during this band's products.
inline void prefetch_part(const Span& s, i64 part, i64 parts, bool write) {
  const i64 lines = (s.bytes + 63) / 64, l0 = lines * part / parts, l1 = lines * (part + 1) / parts;
  for (i64 l = l0; l < l1; ++l) {
    if (write) __builtin_prefetch(s.p + 64 * l, 1, 2);
    else __builtin_prefetch(s.p + 64 * l, 0, 2);
  }
}

// The spans one band prefetches during its products: up to 32, each for reading or writing.
struct Spans {
  Span s[32];
  bool write[32];
  int n = 0;
  void add(const Span& sp, bool w) {
    if (sp.bytes > 0 && n < 32) {
      s[n] = sp;
      write[n++] = w;
    }
  }
  void part(i64 p, i64 parts) const {
    for (int i = 0; i < n; ++i) prefetch_part(s[i], p, parts, write[i]);
  }
};

// rows r0 .. r1 of images n0 .. n0 + 15 (ch channels): 16 spans
template <typename T>
inline void lane_spans(Spans& sp, const T* img, i64 n0, i64 r0, i64 r1, i64 H, i64 W, i64 ch, bool write) {
  if (r1 <= r0) return;
  for (i64 l = 0; l < 16; ++l)
    sp.add({reinterpret_cast<const char*>(img + ((n0 + l) * H + r0) * W * ch), (r1 - r0) * W * ch * i64(sizeof(T))},
           write);
}

// the structure's rows of position p (ptr: 16 S (R + 1) pointers)
inline Rows rows_of(const int32_t* ptr, const int32_t* idx, i64 p, i64 R, i64 ncols) {
  const i64 S = (ncols + SEG - 1) / SEG;
  return Rows{ptr + p * S * (R + 1), idx, R, S};
}

// The forward: the batch's whole groups of 16 images in the lane layout (when `lanes`), then the
// remaining images' tiles in bands.  Work items -- a group, or a band -- are claimed from a counter,
// so a thread that starts late takes fewer; a group is one thread's, its bands in order (the ring of
// input rows carries over from one band to the next).
template <typename T, bool RELU>
void sparse_forward(const T* x, const T* U, T* y, i64 N, i64 H, i64 W, i64 C, i64 K, const int32_t* fptr,
                    const int32_t* fidx, const int32_t* fflat, int nt, double* prof_out, const T* bias, bool orelu,
                    bool lanes) {
  const i64 th = (H + 1) / 2, tw = (W + 1) / 2, per_image = th * tw, tiles = N * per_image;
  if (tiles == 0) return;
  const i64 TB = sparse_band_tiles(C + K, sizeof(T)), ld = sparse_ld(TB);
  const i64 groups = lanes ? N / 16 : 0, t_base = 16 * groups * per_image;  // tiles before t_base: the groups'
  const i64 bands = (tiles - t_base + TB - 1) / TB, items = groups + bands;
  const i64 P = TB / 16;  // tile positions per band of a group
  const LaneRing ring{lane_ring_rows(P, tw), 2 * tw + 2, C};
  const i64 nnz = rows_of(fptr, fidx, 15, K, C).last();
  bool live[16];
  for (int p = 0; p < 16; ++p) {
    const Rows rp = rows_of(fptr, fidx, p, K, C);
    live[p] = rp.last() > rp.first();
  }
  Aligned<T> shared(nnz > PRIVATE_GATHER ? nnz : 0);
  std::atomic<i64> next{0};  // the next item to claim
#pragma omp parallel num_threads(nt)
  {
    Prof prof(prof_out);
    const T* vals = team_values(U, fflat, nnz, shared.data());
    prof.lap(PH_PACK);
    T* Sb = thread_scratch<T>(SLOT_S, 16 * 16 * 16);
    T* VT = thread_scratch<T>(SLOT_VT, 16 * C * ld);
    T* MT = thread_scratch<T>(SLOT_MT, 16 * K * ld);
    T* Yb = thread_scratch<T>(SLOT_YB, 4 * K * ld);
    T* rbuf = nullptr;  // the ring of input rows and a zero row after it (groups only)
    std::vector<T*> drow(4 * TB);
    std::vector<T> zc(C, T(0));
    // the 16 products of a band of nbp columns; the spans prefetched meanwhile (the next band's input,
    // this one's output lines: in the lane layout 16 images' rows each)
    auto products = [&](i64 nbp, const Spans& pf) {
      for (i64 p = 0; p < 16; ++p) {
        pf.part(p, 16);
        T* Mp = MT + p * K * ld;
        if (live[p])
          spmm(vals, rows_of(fptr, fidx, p, K, C), (const T*)(VT + p * C * ld), Mp, ld, nbp);
        else
          for (i64 k = 0; k < K; ++k) std::fill(Mp + k * ld, Mp + k * ld + nbp, T(0));
      }
      prof.lap(PH_MUL);
    };
    for (i64 it = next.fetch_add(1); it < items;) {
      const i64 it1 = next.fetch_add(1);  // this thread's next item, claimed now so that a band's input is prefetched
      if (it < groups) {
        if (!rbuf) {  // zeroed once a call: the rows' padding columns, and the zero row, are never written
          rbuf = thread_scratch<T>(SLOT_RING, (ring.rb + 1) * ring.slot());
          std::fill(rbuf, rbuf + (ring.rb + 1) * ring.slot(), T(0));
        }
        const T* zrow = rbuf + ring.rb * ring.slot();
        const i64 n0 = 16 * it;
        i64 rows = 0;  // input rows of the group in the ring so far
        // input rows a band of the group reads up to (exclusive)
        auto rows_end = [&](i64 s1) { return std::min(H, 2 * ((s1 - 1) / tw) + 3); };
        for (i64 s0 = 0; s0 < per_image; s0 += P) {
          const i64 s1 = std::min(per_image, s0 + P), end = rows_end(s1);
          for (; rows < end; ++rows) lane_row(x, n0, rows, H, W, C, ring, rbuf);
          prof.lap(PH_TIN);
          lane_input<T, RELU>(rbuf, zrow, ring, VT, ld, s0, s1, tw, H, C);
          prof.lap(PH_IN);
          Spans pf;
          if (s1 < per_image) lane_spans(pf, x, n0, end, rows_end(std::min(per_image, s1 + P)), H, W, C, false);
          else if (it1 < groups) lane_spans(pf, x, 16 * it1, i64(0), rows_end(std::min(per_image, P)), H, W, C, false);
          lane_spans(pf, y, n0, 2 * (s0 / tw), std::min(H, 2 * ((s1 - 1) / tw) + 2), H, W, K, true);
          products(16 * (s1 - s0), pf);
          band_pixels((const T*)MT, ld, 16 * (s1 - s0), K, Yb, bias, orelu);
          lane_scatter((const T*)Yb, ld, n0, s0, s1, tw, H, W, K, y);
          prof.lap(PH_OUT);
        }
      } else {
        const i64 t0 = t_base + (it - groups) * TB, nb = std::min(TB, tiles - t0), nbp = (nb + 15) / 16 * 16;
        band_input<T, RELU>(x, Sb, VT, ld, t0, nb, th, tw, H, W, C, live, zc.data(), prof);
        const i64 t1 = t_base + (it1 - groups) * TB;
        Spans pf;
        if (it1 >= groups && it1 < items) pf.add(band_span(x, t1, std::min(TB, tiles - t1), th, tw, H, W, C, true), false);
        pf.add(band_span(y, t0, nb, th, tw, H, W, K, false), true);
        products(nbp, pf);
        band_pixels((const T*)MT, ld, nbp, K, Yb, bias, orelu);
        band_scatter((const T*)Yb, ld, TB, t0, nb, th, tw, H, W, K, y, drow.data());
        prof.lap(PH_OUT);
      }
      it = it1;
    }
    prof.flush();
  }
}

template <typename T, bool RELU>
void sparse_backward(const T* x, const T* gy, const T* U, T* dx, T* dU, i64 N, i64 H, i64 W, i64 C, i64 K,
                     const int32_t* bptr, const int32_t* bidx, const int32_t* bflat, bool need_x, bool need_u, int nt,
                     double* prof_out) {
  if (N == 0) {  // an empty batch: dx has no elements, dU is an empty sum
    if (need_u) std::fill(dU, dU + 16 * C * K, T(0));
    return;
  }
  const i64 th = (H + 1) / 2, tw = (W + 1) / 2, per_image = th * tw;
  const i64 TB = sparse_band_tiles(2 * C + K, sizeof(T)), ld = sparse_ld(TB);
  const i64 nnz = rows_of(bptr, bidx, 15, C, K).last(), G = sparse_groups(N, N * per_image, nnz, sizeof(T));
  bool live[16];
  for (int p = 0; p < 16; ++p) {
    const Rows rp = rows_of(bptr, bidx, p, C, K);
    live[p] = rp.last() > rp.first();
  }
  Aligned<T> shared(nnz > PRIVATE_GATHER ? nnz : 0), part(need_u ? G * nnz : 0);
#pragma omp parallel num_threads(nt)
  {
    Prof prof(prof_out);
    const T* vals = team_values(U, bflat, nnz, shared.data());
    prof.lap(PH_PACK);
    T* Sb = thread_scratch<T>(SLOT_S, 16 * 16 * 16);
    T* VT = thread_scratch<T>(SLOT_VT, 16 * C * ld);
    T* dMT = thread_scratch<T>(SLOT_MT, 16 * K * ld);
    T* dVT = need_x ? thread_scratch<T>(SLOT_DVT, 16 * C * ld) : nullptr;
    T* Yb = thread_scratch<T>(SLOT_YB, 4 * 16 * 16);
    std::vector<T> zc(C, T(0)), sink(16 * C);
#pragma omp for schedule(dynamic, 1)  // (a group's results do not depend on the thread that computes it)
    for (i64 g = 0; g < G; ++g) {
      const i64 n0 = g * N / G, n1 = (g + 1) * N / G;
      if (need_x) std::fill(dx + n0 * H * W * C, dx + n1 * H * W * C, T(0));
      if (need_u) std::fill(part.data() + g * nnz, part.data() + (g + 1) * nnz, T(0));  // (this group's thread only)
      for (i64 t0 = n0 * per_image; t0 < n1 * per_image; t0 += TB) {
        const i64 nb = std::min(TB, n1 * per_image - t0), nbp = (nb + 15) / 16 * 16;
        band_input<T, RELU>(x, Sb, VT, ld, t0, nb, th, tw, H, W, C, live, zc.data(), prof);
        band_output_adjoint(gy, dMT, ld, t0, nb, th, tw, H, W, K, Yb);
        prof.lap(PH_OADJ);
        if (need_u && need_x) {  // both products in one pass
          for (i64 p = 0; p < 16; ++p) {
            T* dVp = dVT + p * C * ld;
            if (live[p])
              backward_products<T, RELU>(vals, rows_of(bptr, bidx, p, C, K), VT + p * C * ld,
                                         dMT + p * K * ld, dVp, ld, nbp, part.data() + g * nnz);
            else
              for (i64 c = 0; c < C; ++c) std::fill(dVp + c * ld, dVp + c * ld + nbp, T(0));
          }
          prof.lap(PH_DV);
        } else if (need_u) {
          for (i64 p = 0; p < 16; ++p)
            if (live[p])
              sddmm(rows_of(bptr, bidx, p, C, K), (const T*)(VT + p * C * ld), (const T*)(dMT + p * K * ld), ld,
                    nbp, part.data() + g * nnz);
          prof.lap(PH_DU);
        } else {
          for (i64 p = 0; p < 16; ++p) {
            T* dVp = dVT + p * C * ld;
            if (live[p]) {
              spmm(vals, rows_of(bptr, bidx, p, C, K), (const T*)(dMT + p * K * ld), dVp, ld, nbp);
              if (RELU) relu_mask(dVp, (const T*)(VT + p * C * ld), C, ld, nbp);
            } else {
              for (i64 c = 0; c < C; ++c) std::fill(dVp + c * ld, dVp + c * ld + nbp, T(0));
            }
          }
          prof.lap(PH_DV);
        }
        if (!need_x) continue;
        TileAt a(t0, th, tw);
        for (i64 q = 0; q < nb; q += 16) {  // dx += B dV B^T (the ReLU's mask is applied above)
          const i64 cnt = std::min<i64>(16, nb - q);
          T* taps[16][16];
          for (i64 l = 0; l < cnt; ++l, a.next()) {
            T* row[4];
            image_rows(dx + a.n * H * W * C, a.i, H, W, C, row);
            for (int r = 0; r < 4; ++r)
              for (int b = 0; b < 4; ++b) {
                const i64 w = 2 * a.j + b - 1;
                taps[l][4 * r + b] = row[r] && w >= 0 && w < W ? row[r] + w * C : sink.data() + (4 * r + b) * C;
              }
          }
          for (i64 c0 = 0; c0 < C; c0 += 16) {
            const i64 nc = std::min<i64>(16, C - c0);
            for (i64 p = 0; p < 16; ++p)
              transpose16((const T*)(dVT + (p * C + c0) * ld + q), ld, int(nc), int(cnt), Sb + p * 256, 16);
            prof.lap(PH_TDV);
            for (i64 l = 0; l < cnt; ++l) input_adjoint_taps(taps[l], c0, nc, (const T*)(Sb + l * 16), 256);
            prof.lap(PH_IADJ);
          }
        }
      }
    }
    if (need_u) {  // per position: zero off the mask, on it the group sums in group order
      prof.skip();
      const T* pt = part.data();
#pragma omp for schedule(static) nowait
      for (i64 p = 0; p < 16; ++p) {
        std::fill(dU + p * C * K, dU + (p + 1) * C * K, T(0));
        const Rows rp = rows_of(bptr, bidx, p, C, K);
        for (i64 e = rp.first(); e < rp.last(); ++e) {
          T acc = pt[e];
          for (i64 g = 1; g < G; ++g) acc += pt[g * nnz + e];
          dU[bflat[e]] = acc;
        }
      }
      prof.lap(PH_RED);
    }
    prof.flush();
  }
}


// ---------------------------------------------------------------------------------------------------
// chains in the lane layout: consecutive sparse layers and max-pools without leaving it
// ---------------------------------------------------------------------------------------------------
// A group of 16 images in the lane layout holds, per pixel and channel, the 16 images' values in one
// vector.  The sparse forward above enters it from the channels-last input (the lane_row transposes)
// and leaves it to the channels-last output (lane_scatter's transposes): as much time as the input
// transform, or the products at a density of 0.2, each, and a pass over the activations through
// memory each.  A network's consecutive stages -- sparse layers, and the max-pools between them --
// run here on one group at a time without leaving it: a stage's output is the next stage's input as
// a whole lane image per group (H rows of `lane_wp(W)` columns of C x 16 values, the image at columns
// 1 .. W, the others zero: the Winograd layer's padding), two such images per thread taking turns.
// Only the chain's input is transposed into the lanes, and only its output out of them; a max-pool
// in the lanes is a maximum of whole vectors (no shuffles), and a pool at the chain's end transposes
// a quarter of the pixels.
//
// The arithmetic of every stage is the one-stage path's, in the same order, so a chain gives the
// same bits as its stages run one after another (the sparse forward in the lane layout, torch's
// max_pool2d).  The caller passes whole groups (N a multiple of 16).

// columns of a lane image of width W: tap columns -1 .. 2 ceil(W / 2) of the Winograd layer
inline i64 lane_wp(i64 W) { return 2 * ((W + 1) / 2) + 2; }

struct ChainStage {
  bool pool = false;
  i64 C = 0, K = 0, H = 0, W = 0, Ho = 0, Wo = 0;  // input channels and size, output channels and size
  // a sparse Winograd-ReLU layer (3x3, padding 1: Ho = H, Wo = W)
  const float* U = nullptr;
  const int32_t *fptr = nullptr, *fidx = nullptr, *fflat = nullptr;
  const float* bias = nullptr;
  bool relu = false, orelu = false, live[16] = {};
  i64 TB = 0, ld = 0, nnz = 0, voff = 0;  // band, row stride of its planes, nonzeros, offset of its values
  // a max-pool (window k, stride s, padding p; K = C)
  i64 k = 0, s = 0, p = 0;
  i64 in_size() const { return H * lane_wp(W) * C * 16; }
  i64 out_size() const { return Ho * lane_wp(Wo) * K * 16; }
};

// zero the columns of a lane image that are not the image's (0, and W + 1 .. wp - 1)
inline void lane_pad_columns(float* img, i64 H, i64 W, i64 C) {
  const i64 wp = lane_wp(W), row = wp * C * 16;
  for (i64 h = 0; h < H; ++h) {
    float* r = img + h * row;
    std::fill(r, r + C * 16, 0.f);
    std::fill(r + (W + 1) * C * 16, r + row, 0.f);
  }
}

// Yb's four pixels of positions s0 .. s1 (band_pixels) into a lane image (H x W, K channels): plain
// vector copies, the lanes are already the images
inline void lane_store(const float* Yb, i64 ld, i64 s0, i64 s1, i64 tw, i64 H, i64 W, i64 K, float* img) {
  const i64 ys = K * ld, row = lane_wp(W) * K * 16;
  for (i64 s = s0; s < s1; ++s) {
    const i64 i = s / tw, j = s % tw;
    for (int ab = 0; ab < 4; ++ab) {
      const i64 h = 2 * i + ab / 2, w = 2 * j + ab % 2;
      if (h >= H || w >= W) continue;
      const float* __restrict src = Yb + ab * ys + 16 * (s - s0);
      float* __restrict dst = img + h * row + (w + 1) * K * 16;
      for (i64 k = 0; k < K; ++k) {
#pragma omp simd
        for (int l = 0; l < 16; ++l) dst[k * 16 + l] = src[k * ld + l];
      }
    }
  }
}

// max-pool of a lane image (H x W, C channels) to a lane image (Ho x Wo), or, with y, to images
// n0 .. n0 + 15 of the channels-last output; torch's semantics: the window's maximum over the pixels
// inside the image (padding is not a value), a NaN wins
inline void lane_pool(const ChainStage& st, const float* in, float* out, float* y, i64 n0, float* pix) {
  const i64 C = st.C, rin = lane_wp(st.W) * C * 16, rout = lane_wp(st.Wo) * C * 16;
  float* drow[16];
  for (i64 oh = 0; oh < st.Ho; ++oh) {
    const i64 h0 = std::max<i64>(0, oh * st.s - st.p), h1 = std::min<i64>(st.H, oh * st.s - st.p + st.k);
    for (i64 ow = 0; ow < st.Wo; ++ow) {
      const i64 w0 = std::max<i64>(0, ow * st.s - st.p), w1 = std::min<i64>(st.W, ow * st.s - st.p + st.k);
      float* __restrict o = y ? pix : out + oh * rout + (ow + 1) * C * 16;
      for (i64 c = 0; c < C; ++c) {
        float m[16];
        for (int l = 0; l < 16; ++l) m[l] = -std::numeric_limits<float>::infinity();
        for (i64 h = h0; h < h1; ++h)
          for (i64 w = w0; w < w1; ++w) {
            const float* __restrict v = in + h * rin + (w + 1) * C * 16 + c * 16;
#pragma omp simd
            for (int l = 0; l < 16; ++l) m[l] = (v[l] > m[l] || v[l] != v[l]) ? v[l] : m[l];
          }
#pragma omp simd
        for (int l = 0; l < 16; ++l) o[c * 16 + l] = m[l];
      }
      if (y) {
        for (int l = 0; l < 16; ++l) drow[l] = y + (((n0 + l) * st.Ho + oh) * st.Wo + ow) * C;
        for (i64 c0 = 0; c0 < C; c0 += 16) transpose16_to((const float*)(pix + c0 * 16), 16, int(std::min<i64>(16, C - c0)), 16, drow, c0);
      }
    }
  }
}

// One group's sparse layer from lane image `in`: band by band as sparse_forward's groups, its output
// to lane image `out`, or (y) transposed into the channels-last output.
template <bool RELU>
void lane_layer(const ChainStage& st, const float* vals, const float* in, const float* zrow, float* out, float* y,
                i64 n0, float* VT, float* MT, float* Yb, Prof& prof) {
  const i64 th = (st.H + 1) / 2, tw = (st.W + 1) / 2, per_image = th * tw, P = st.TB / 16, ld = st.ld;
  const LaneRing ring{std::max<i64>(1, st.H), lane_wp(st.W), st.C};  // the whole image: row h in slot h
  for (i64 s0 = 0; s0 < per_image; s0 += P) {
    const i64 s1 = std::min(per_image, s0 + P), nbp = 16 * (s1 - s0);
    lane_input<float, RELU>(in, zrow, ring, VT, ld, s0, s1, tw, st.H, st.C);
    prof.lap(PH_IN);
    for (i64 p = 0; p < 16; ++p) {
      float* Mp = MT + p * st.K * ld;
      if (st.live[p])
        spmm(vals, rows_of(st.fptr, st.fidx, p, st.K, st.C), (const float*)(VT + p * st.C * ld), Mp, ld, nbp);
      else
        for (i64 k = 0; k < st.K; ++k) std::fill(Mp + k * ld, Mp + k * ld + nbp, 0.f);
    }
    prof.lap(PH_MUL);
    band_pixels((const float*)MT, ld, nbp, st.K, Yb, st.bias, st.orelu);
    if (y) lane_scatter((const float*)Yb, ld, n0, s0, s1, tw, st.H, st.W, st.K, y);
    else lane_store(Yb, ld, s0, s1, tw, st.H, st.W, st.K, out);
    prof.lap(PH_OUT);
  }
}

// x (N, H, W, C) channels-last, N a multiple of 16 -> y, the last stage's output, channels-last
void lane_chain(const float* x, float* y, i64 N, std::vector<ChainStage>& st, int nt, double* prof_out) {
  if (N < 16 || st.empty()) return;
  i64 lane_max = 1, vt_max = 1, mt_max = 1, yb_max = 1, zrow_max = 1, nnz = 0;
  for (ChainStage& s : st) {
    lane_max = std::max({lane_max, s.in_size(), s.out_size()});
    zrow_max = std::max(zrow_max, lane_wp(s.W) * s.C * 16);
    if (s.pool) continue;
    s.TB = sparse_band_tiles(s.C + s.K, sizeof(float));
    s.ld = sparse_ld(s.TB);
    s.nnz = rows_of(s.fptr, s.fidx, 15, s.K, s.C).last();
    s.voff = nnz;
    nnz += s.nnz;
    for (int p = 0; p < 16; ++p) {
      const Rows rp = rows_of(s.fptr, s.fidx, p, s.K, s.C);
      s.live[p] = rp.last() > rp.first();
    }
    vt_max = std::max(vt_max, 16 * s.C * s.ld);
    mt_max = std::max(mt_max, 16 * s.K * s.ld);
    yb_max = std::max(yb_max, 4 * s.K * s.ld);
  }
  const ChainStage& s0 = st.front();
  const i64 groups = N / 16;
  std::atomic<i64> next{0};
  Aligned<float> shared(nnz > PRIVATE_GATHER ? nnz : 0);
#pragma omp parallel num_threads(nt)
  {
    Prof prof(prof_out);
    // every layer's values: this thread's copy, or the team's where they are many (as team_values)
    const bool team = nnz > PRIVATE_GATHER;
    float* vals = team ? shared.data() : thread_scratch<float>(SLOT_VALS, std::max<i64>(1, nnz));
    for (const ChainStage& s : st)
      if (!s.pool) gather(s.U, s.fflat, s.nnz, vals + s.voff, team);  // (team: an omp for, every thread)
    prof.lap(PH_PACK);
    float* A = thread_scratch<float>(SLOT_LANE_A, lane_max);
    float* B = thread_scratch<float>(SLOT_LANE_B, lane_max);
    float* zrow = thread_scratch<float>(SLOT_ZROW, zrow_max);
    std::fill(zrow, zrow + zrow_max, 0.f);
    float* VT = thread_scratch<float>(SLOT_VT, vt_max);
    float* MT = thread_scratch<float>(SLOT_MT, mt_max);
    float* Yb = thread_scratch<float>(SLOT_YB, yb_max);
    float* pix = thread_scratch<float>(SLOT_S, 16 * s0.C + 16 * std::max<i64>(1, st.back().K));
    const LaneRing ring{std::max<i64>(1, s0.H), lane_wp(s0.W), s0.C};
    for (i64 g = next.fetch_add(1); g < groups; g = next.fetch_add(1)) {
      const i64 n0 = 16 * g;
      for (i64 r = 0; r < s0.H; ++r) lane_row(x, n0, r, s0.H, s0.W, s0.C, ring, A);
      lane_pad_columns(A, s0.H, s0.W, s0.C);
      prof.lap(PH_TIN);
      float *in = A, *out = B;
      for (size_t i = 0; i < st.size(); ++i) {
        const ChainStage& s = st[i];
        float* yo = i + 1 == st.size() ? y : nullptr;
        if (s.pool) {
          lane_pool(s, in, out, yo, n0, pix);
          prof.lap(PH_OUT);
        } else if (s.relu) {
          lane_layer<true>(s, vals + s.voff, in, zrow, out, yo, n0, VT, MT, Yb, prof);
        } else {
          lane_layer<false>(s, vals + s.voff, in, zrow, out, yo, n0, VT, MT, Yb, prof);
        }
        if (!yo) {
          lane_pad_columns(out, s.Ho, s.Wo, s.K);
          std::swap(in, out);
        }
      }
    }
    prof.flush();
  }
}

}  // namespace

// C entry points (ctypes): dtype 0 = float32, 1 = float64; relu 0 / 1.  Pointers are the tensors' data.
extern "C" {

int esdbs_wino_abi_version() { return 6; }

// 1 where the GEMMs below were compiled (AVX-512); else the caller runs torch.bmm.
int esdbs_wino_has_gemm() { return ESDBS_HAS_GEMM; }

#if ESDBS_HAS_GEMM
void esdbs_wino_gemm_nn(const float* A, const float* B, float* C, i64 P, i64 T, i64 n, i64 K, int nt) {
  gemm_nn(A, B, C, P, T, n, K, nt);
}

void esdbs_wino_gemm_tn(const float* A, const float* B, float* C, i64 P, i64 T, i64 Cd, i64 K, int nt) {
  gemm_tn(A, B, C, P, T, Cd, K, nt);
}

// the fused layer (float32): x, y, dy, dx NHWC; U (16, C, K), Ut (16, K, C); dU (16, C, K)
// bias (K values, or nullptr) and orelu: the inference epilogue (output_tile)
void esdbs_wino_fused_forward(const float* x, const float* U, float* y, i64 N, i64 H, i64 W, i64 C, i64 K, int relu,
                              int nt, const float* bias, int orelu) {
  with_epilogue(bias != nullptr, orelu != 0, [&](auto B, auto R) {
    constexpr bool b = decltype(B)::value, r = decltype(R)::value;
    if (relu) fused_forward<true, b, r>(x, U, y, N, H, W, C, K, nt, bias);
    else fused_forward<false, b, r>(x, U, y, N, H, W, C, K, nt, bias);
  });
}

void esdbs_wino_fused_backward(const float* x, const float* gy, const float* Ut, float* dx, float* dU, i64 N, i64 H,
                               i64 W, i64 C, i64 K, int relu, int need_x, int need_u, int nt) {
  if (relu) fused_backward<true>(x, gy, Ut, dx, dU, N, H, W, C, K, need_x != 0, need_u != 0, nt);
  else fused_backward<false>(x, gy, Ut, dx, dU, N, H, W, C, K, need_x != 0, need_u != 0, nt);
}
#endif

void esdbs_wino_input_transform(int dtype, const void* x, void* V, i64 N, i64 H, i64 W, i64 C, int relu, int nt) {
  if (dtype == 0 && relu) input_transform<float, true>((const float*)x, (float*)V, N, H, W, C, nt);
  else if (dtype == 0) input_transform<float, false>((const float*)x, (float*)V, N, H, W, C, nt);
  else if (relu) input_transform<double, true>((const double*)x, (double*)V, N, H, W, C, nt);
  else input_transform<double, false>((const double*)x, (double*)V, N, H, W, C, nt);
}

void esdbs_wino_output_transform(int dtype, const void* M, void* y, i64 N, i64 H, i64 W, i64 K, int nt,
                                 const void* bias, int orelu) {
  if (dtype == 0) output_transform((const float*)M, (float*)y, N, H, W, K, nt, (const float*)bias, orelu != 0);
  else output_transform((const double*)M, (double*)y, N, H, W, K, nt, (const double*)bias, orelu != 0);
}

void esdbs_wino_output_transform_adjoint(int dtype, const void* gy, void* dM, i64 N, i64 H, i64 W, i64 K, int nt) {
  if (dtype == 0) output_transform_adjoint((const float*)gy, (float*)dM, N, H, W, K, nt);
  else output_transform_adjoint((const double*)gy, (double*)dM, N, H, W, K, nt);
}

void esdbs_wino_input_transform_adjoint(int dtype, const void* dV, const void* V, void* dx, i64 N, i64 H, i64 W,
                                        i64 C, int relu, int nt) {
  if (dtype == 0 && relu)
    input_transform_adjoint<float, true>((const float*)dV, (const float*)V, (float*)dx, N, H, W, C, nt);
  else if (dtype == 0)
    input_transform_adjoint<float, false>((const float*)dV, (const float*)V, (float*)dx, N, H, W, C, nt);
  else if (relu)
    input_transform_adjoint<double, true>((const double*)dV, (const double*)V, (double*)dx, N, H, W, C, nt);
  else
    input_transform_adjoint<double, false>((const double*)dV, (const double*)V, (double*)dx, N, H, W, C, nt);
}

// the sparse layer (float32 / float64 by dtype): x, y, gy, dx NHWC; U, dU (16, C, K); the mask's
// structure as winograd_sparse.py builds it (int32, segment-major, see the sparse layer above): by
// output channel fptr (16 ceil(C / SEG) (K + 1)), fidx, fflat (nnz); by input channel bptr
// (16 ceil(K / SEG) (C + 1)), bidx, bflat.  prof: nullptr, or esdbs_wino_sparse_phases() doubles to
// add each phase's seconds into.
int esdbs_wino_sparse_phases() { return PH_COUNT; }

// the column segment of the structure's storage order
i64 esdbs_wino_sparse_segment() { return SEG; }

// the tiles per band of a forward (backward = 0) or backward pass (dtype 0 float32, 1 float64)
i64 esdbs_wino_sparse_band_tiles(i64 C, i64 K, int dtype, int backward) {
  return sparse_band_tiles(backward ? 2 * C + K : C + K, dtype == 0 ? 4 : 8);
}

// bias (K values of the dtype, or nullptr) and orelu: the inference epilogue; lanes: whole groups of
// 16 images in the lane layout (0: every tile in the band layout)
void esdbs_wino_sparse_forward(int dtype, const void* x, const void* U, void* y, i64 N, i64 H, i64 W, i64 C, i64 K,
                               const int32_t* fptr, const int32_t* fidx, const int32_t* fflat, int relu, int nt,
                               double* prof, const void* bias, int orelu, int lanes) {
  const bool o = orelu != 0, l = lanes != 0;
  if (dtype == 0 && relu)
    sparse_forward<float, true>((const float*)x, (const float*)U, (float*)y, N, H, W, C, K, fptr, fidx, fflat, nt, prof,
                                (const float*)bias, o, l);
  else if (dtype == 0)
    sparse_forward<float, false>((const float*)x, (const float*)U, (float*)y, N, H, W, C, K, fptr, fidx, fflat, nt,
                                 prof, (const float*)bias, o, l);
  else if (relu)
    sparse_forward<double, true>((const double*)x, (const double*)U, (double*)y, N, H, W, C, K, fptr, fidx, fflat, nt,
                                 prof, (const double*)bias, o, l);
  else
    sparse_forward<double, false>((const double*)x, (const double*)U, (double*)y, N, H, W, C, K, fptr, fidx, fflat,
                                  nt, prof, (const double*)bias, o, l);
}

void esdbs_wino_sparse_backward(int dtype, const void* x, const void* gy, const void* U, void* dx, void* dU, i64 N,
                                i64 H, i64 W, i64 C, i64 K, const int32_t* bptr, const int32_t* bidx,
                                const int32_t* bflat, int relu, int need_x, int need_u, int nt, double* prof) {
  const bool nx = need_x != 0, nu = need_u != 0;
  if (dtype == 0 && relu)
    sparse_backward<float, true>((const float*)x, (const float*)gy, (const float*)U, (float*)dx, (float*)dU, N, H, W,
                                 C, K, bptr, bidx, bflat, nx, nu, nt, prof);
  else if (dtype == 0)
    sparse_backward<float, false>((const float*)x, (const float*)gy, (const float*)U, (float*)dx, (float*)dU, N, H,
                                  W, C, K, bptr, bidx, bflat, nx, nu, nt, prof);
  else if (relu)
    sparse_backward<double, true>((const double*)x, (const double*)gy, (const double*)U, (double*)dx, (double*)dU,
                                  N, H, W, C, K, bptr, bidx, bflat, nx, nu, nt, prof);
  else
    sparse_backward<double, false>((const double*)x, (const double*)gy, (const double*)U, (double*)dx, (double*)dU,
                                   N, H, W, C, K, bptr, bidx, bflat, nx, nu, nt, prof);
}

// A chain of stages in the lane layout (float32; see "chains in the lane layout"): x (N, H, W, C)
// channels-last with N a multiple of 16, y the last stage's output channels-last.  Stage i: desc[8 i ..]
// = kind (0: sparse layer, 1: max-pool), then for a layer K, relu, orelu and for a pool k, s, p; ptrs[5 i ..]
// = a layer's U, fptr, fidx, fflat (its structure by output channel) and bias (or nullptr).
void esdbs_wino_lane_chain(const float* x, float* y, i64 N, i64 H, i64 W, i64 C, int nstages, const i64* desc,
                           const void* const* ptrs, int nt, double* prof) {
  std::vector<ChainStage> st(nstages);
  for (int i = 0; i < nstages; ++i) {
    ChainStage& s = st[i];
    const i64* d = desc + 8 * i;
    s.C = C;
    s.H = H;
    s.W = W;
    if (d[0] == 1) {
      s.pool = true;
      s.k = d[1];
      s.s = d[2];
      s.p = d[3];
      s.K = C;
      s.Ho = (H + 2 * s.p - s.k) / s.s + 1;
      s.Wo = (W + 2 * s.p - s.k) / s.s + 1;
    } else {
      s.K = d[1];
      s.relu = d[2] != 0;
      s.orelu = d[3] != 0;
      s.Ho = H;
      s.Wo = W;
      s.U = (const float*)ptrs[5 * i];
      s.fptr = (const int32_t*)ptrs[5 * i + 1];
      s.fidx = (const int32_t*)ptrs[5 * i + 2];
      s.fflat = (const int32_t*)ptrs[5 * i + 3];
      s.bias = (const float*)ptrs[5 * i + 4];
    }
    C = s.K;
    H = s.Ho;
    W = s.Wo;
  }
  lane_chain(x, y, N, st, nt, prof);
}

}  // extern "C"
