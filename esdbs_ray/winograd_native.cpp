// Winograd-ReLU F(2x2, 3x3) for the CPU, shape-generic: the four passes over memory of a training step
// that are not GEMMs; on AVX-512 CPUs the 16 GEMMs too (elsewhere those stay torch.bmm), and the layer
// fused band by band.  Built once per machine by esdbs_ray/winograd_native.py with the system C++
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
#include <cstdint>
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

// forward: V = [ReLU](B^T d B) from the zero-padded input (padding 1, rounded up to whole tiles)
template <typename T, bool RELU>
inline void input_row(const T* __restrict x, T* __restrict V, i64 ps, i64 n, i64 i, i64 H, i64 W, i64 C,
                      const T* z) {
  const i64 tw = (W + 1) / 2;
  const T* row[4];
  bool rin[4];
  for (int a = 0; a < 4; ++a) {
    const i64 h = 2 * i + a - 1;
    rin[a] = h >= 0 && h < H;
    row[a] = x + (n * H + (rin[a] ? h : 0)) * W * C;
  }
  for (i64 j = 0; j < tw; ++j) {
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
    T* __restrict out = V + j * C;
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
}

// forward: Y = A^T M A per tile, cropped to H x W, written NHWC
template <typename T>
inline void output_row(const T* __restrict M, i64 ps, T* __restrict y, i64 n, i64 i, i64 H, i64 W, i64 K) {
  const i64 tw = (W + 1) / 2;
  const bool h1 = 2 * i + 1 < H;
  T* y0 = y + (n * H + 2 * i) * W * K;
  T* y1 = y0 + W * K;
  for (i64 j = 0; j < tw; ++j) {
    const bool w1 = 2 * j + 1 < W;
    const T* m = M + j * K;
    T* o00 = y0 + 2 * j * K;
#pragma omp simd
    for (i64 k = 0; k < K; ++k) {
      T t[4][2];  // t[p][b]: A^T along the columns of M's row p
      for (int p = 0; p < 4; ++p) {
        const T m0 = m[(4 * p + 0) * ps + k], m1 = m[(4 * p + 1) * ps + k];
        const T m2 = m[(4 * p + 2) * ps + k], m3 = m[(4 * p + 3) * ps + k];
        t[p][0] = m0 + m1 + m2; t[p][1] = m1 - m2 - m3;
      }
      o00[k] = t[0][0] + t[1][0] + t[2][0];
      if (w1) o00[K + k] = t[0][1] + t[1][1] + t[2][1];
      if (h1) {
        T* o10 = y1 + 2 * j * K;
        o10[k] = t[1][0] - t[2][0] - t[3][0];
        if (w1) o10[K + k] = t[1][1] - t[2][1] - t[3][1];
      }
    }
  }
}

// backward: dM = A dY A^T per tile (the adjoint of output_row; rows / columns past H, W are 0)
template <typename T>
inline void output_adjoint_row(const T* __restrict gy, T* __restrict dM, i64 ps, i64 n, i64 i, i64 H, i64 W,
                               i64 K, const T* z) {
  const i64 tw = (W + 1) / 2;
  const bool h1 = 2 * i + 1 < H;
  const T* g0 = gy + (n * H + 2 * i) * W * K;
  const T* g1 = h1 ? g0 + W * K : nullptr;
  for (i64 j = 0; j < tw; ++j) {
    const bool w1 = 2 * j + 1 < W;
    const T* g00 = g0 + 2 * j * K;
    const T* g01 = w1 ? g00 + K : z;
    const T* g10 = h1 ? g1 + 2 * j * K : z;
    const T* g11 = h1 && w1 ? g10 + K : z;
    T* out = dM + j * K;
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
}

// backward: dx += B [dV masked by V > 0] B^T per tile, overlap-added into image n's pixels (`img`).
// Tiles overlap by two pixels in each direction: one thread adds all of an image's tile rows, in
// order, and tiles of a row left to right.  Pixels outside the image (padding) go to `sink`, 16
// scratch rows of C values (one per tile position: the restrict pointers never alias), so the channel
// loop has no branches.
template <typename T, bool RELU>
inline void input_adjoint_row(const T* __restrict dV, const T* __restrict V, i64 ps, T* img, i64 i, i64 H, i64 W,
                              i64 C, T* sink) {
  const i64 tw = (W + 1) / 2;
  T* row[4];
  for (int a = 0; a < 4; ++a) {
    const i64 h = 2 * i + a - 1;
    row[a] = h >= 0 && h < H ? img + h * W * C : nullptr;
  }
  for (i64 j = 0; j < tw; ++j) {
    const T* __restrict g = dV + j * C;
    const T* __restrict v = V + j * C;
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
void output_transform(const T* M, T* y, i64 N, i64 H, i64 W, i64 K, int nt) {
  const i64 th = (H + 1) / 2, tw = (W + 1) / 2, ps = N * th * tw * K;
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
  for (i64 n = 0; n < N; ++n)
    for (i64 i = 0; i < th; ++i) output_row(M + (n * th + i) * tw * K, ps, y, n, i, H, W, K);
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

template <bool RELU>
void fused_forward(const float* x, const float* U, float* y, i64 N, i64 H, i64 W, i64 C, i64 K, int nt) {
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
      for (i64 r = r0; r < r1; ++r) output_row(Mb.data() + (r - r0) * tw * K, pm, y, r / th, r % th, H, W, K);
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
#pragma omp for schedule(static)
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

}  // namespace

// C entry points (ctypes): dtype 0 = float32, 1 = float64; relu 0 / 1.  Pointers are the tensors' data.
extern "C" {

int esdbs_wino_abi_version() { return 3; }

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
void esdbs_wino_fused_forward(const float* x, const float* U, float* y, i64 N, i64 H, i64 W, i64 C, i64 K, int relu,
                              int nt) {
  if (relu) fused_forward<true>(x, U, y, N, H, W, C, K, nt);
  else fused_forward<false>(x, U, y, N, H, W, C, K, nt);
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

void esdbs_wino_output_transform(int dtype, const void* M, void* y, i64 N, i64 H, i64 W, i64 K, int nt) {
  if (dtype == 0) output_transform((const float*)M, (float*)y, N, H, W, K, nt);
  else output_transform((const double*)M, (double*)y, N, H, W, K, nt);
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

}  // extern "C"
