// Per-instruction-set AdderNet micro-kernels; see adder_cpu.cpp for the algorithm.
//
// No include guard on purpose: adder_cpu.cpp includes this file once per instruction set, each time inside its
// own namespace and (for AVX2 / AVX-512) inside a `#pragma GCC target` region, so every function below, templates
// and helpers included, is compiled for that instruction set. (Helpers compiled for the baseline target and then
// inlined would have had their wide vectors split into SSE pieces before inlining.) The includer defines:
//   EFFNETS_VECTOR_BYTES   width of one vector register (16, 32 or 64)
//   EFFNETS_FORWARD_ROWS   output channels per forward micro-kernel (OR)
//   EFFNETS_GRAD_ROWS      input channels per input-gradient micro-kernel (CR)
//   EFFNETS_HAS_FMA        whether the target has fused multiply-add
// Both micro-kernels cover PR = 2 vectors of positions, i.e. a panel of PB = 2 * VW positions.

constexpr int kForwardRows = EFFNETS_FORWARD_ROWS;
constexpr int kGradRows = EFFNETS_GRAD_ROWS;
constexpr int kPanelVectors = 2;
constexpr bool kHasFma = EFFNETS_HAS_FMA;

template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(EFFNETS_VECTOR_BYTES)));
  static constexpr int width = EFFNETS_VECTOR_BYTES / sizeof(T);
};

template <typename T>
constexpr int64_t panel_width() {
  return int64_t(Vec<T>::width) * kPanelVectors;
}

// Loads/stores through memcpy compile to unaligned vector moves (panel buffers have the allocator's alignment).
template <typename V, typename T>
EFFNETS_INLINE V vload(const T* p) {
  V v;
  __builtin_memcpy(&v, p, sizeof(V));
  return v;
}
template <typename V, typename T>
EFFNETS_INLINE void vstore(T* p, V v) {
  __builtin_memcpy(p, &v, sizeof(V));
}
template <typename V, typename T>
EFFNETS_INLINE V vbroadcast(T s) {
  return s - V{};  // one broadcast: s - 0.0 == s exactly, even for -0.0 (0.0 + s would need a real add)
}
template <typename V>
EFFNETS_INLINE V vmin(V a, V b) {
  return a < b ? a : b;
}
template <typename V>
EFFNETS_INLINE V vmax(V a, V b) {
  return a > b ? a : b;
}

// The forward accumulates acc + min(x, w) as fma(min, 1, acc) where FMA exists: on CPUs whose min and add share
// execution ports (AMD Zen 4 measured here: min+add 1.15 ns vs min+fma 0.83 ns per 512-bit pair) this moves the
// add to the multiply-add ports. `one` is read from a volatile so the compiler cannot fold the multiply away.
template <typename V, typename T>
EFFNETS_INLINE V opaque_one() {
  static volatile T one = T(1);
  return vbroadcast<V>(T(one));
}

// Vectors of BYTES bytes, for the copies below (always a power of two between 16 and EFFNETS_VECTOR_BYTES).
template <typename T, int BYTES>
struct VecOf {
  typedef T type __attribute__((vector_size(BYTES)));
};

// dst[0, len) = src[0, len) (or zeros) with vector moves. Runs are short (one feature-map row, often 8-32
// values) and the panels are rebuilt for every output block, so this is hot: a libc memcpy call per run cost
// more than the copy. The tail is covered by one more vector move that overlaps the previous one (it writes the
// same values again), so no scalar loop runs for len >= 16 bytes.
template <typename T, int BYTES, bool ZERO>
EFFNETS_INLINE bool move_run(T* dst, const T* src, int64_t len) {
  using V = typename VecOf<T, BYTES>::type;
  constexpr int64_t W = BYTES / sizeof(T);
  if (len < W) return false;
  int64_t t = 0;
  for (; t + W <= len; t += W) vstore<V>(dst + t, ZERO ? V{} : vload<V>(src + t));
  if (t < len) vstore<V>(dst + len - W, ZERO ? V{} : vload<V>(src + len - W));
  return true;
}

template <typename T, bool ZERO>
EFFNETS_INLINE void move_any(T* dst, const T* src, int64_t len) {
  if (move_run<T, EFFNETS_VECTOR_BYTES, ZERO>(dst, src, len)) return;
  if constexpr (EFFNETS_VECTOR_BYTES >= 64)
    if (move_run<T, 32, ZERO>(dst, src, len)) return;
  if constexpr (EFFNETS_VECTOR_BYTES >= 32)
    if (move_run<T, 16, ZERO>(dst, src, len)) return;
  for (int64_t t = 0; t < len; ++t) dst[t] = ZERO ? T(0) : src[t];
}

template <typename T>
EFFNETS_INLINE void copy_run(T* dst, const T* src, int64_t len) {
  move_any<T, false>(dst, src, len);
}
template <typename T>
EFFNETS_INLINE void zero_run(T* dst, int64_t len) {
  move_any<T, true>(dst, dst, len);
}

// dst[t] = src[start + t*step] for t in [0, len), zero where start + t*step leaves [0, size) (the padding).
template <typename T>
EFFNETS_INLINE void gather_run(T* dst, const T* src, int64_t start, int64_t step, int64_t len, int64_t size) {
  if (step == 1) {
    const int64_t lo = std::min(std::max<int64_t>(-start, 0), len);
    const int64_t hi = std::max(std::min(size - start, len), lo);
    for (int64_t t = 0; t < lo; ++t) dst[t] = T(0);
    copy_run(dst + lo, src + start + lo, hi - lo);
    for (int64_t t = hi; t < len; ++t) dst[t] = T(0);
  } else {
    for (int64_t t = 0; t < len; ++t) {
      const int64_t i = start + t * step;
      dst[t] = (i >= 0 && i < size) ? src[i] : T(0);
    }
  }
}

// ------------------------------------------------------------------------------------------------ forward
template <typename T>
void forward_tasks(const ForwardArgs<T>& a, int64_t begin, int64_t end) {
  using V = typename Vec<T>::type;
  constexpr int VW = Vec<T>::width, PR = kPanelVectors, OR = kForwardRows;
  constexpr int PB = VW * PR;
  const Geometry& g = a.g;
  const int64_t K = g.K, L = g.OH * g.OW, P = g.N * L;
  const int64_t npan = (P + PB - 1) / PB, nob = (g.Og + OR - 1) / OR;
  std::vector<T> xt(K * PB), out(OR * PB);
  Run runs[PB];
  const V one = opaque_one<V, T>();
  for (int64_t task = begin; task < end; ++task) {
    const int64_t grp = task / npan, p0 = (task % npan) * PB;
    const int64_t nq = std::min<int64_t>(PB, P - p0);
    const int nr = make_runs(p0, nq, g.OH, g.OW, runs);
    // Implicit im2col of this panel only: xt[k][q] = X[n, grp*Cg + c, oh*sh - ph + i*dh, ow*sw - pw + j*dw].
    for (int64_t c = 0; c < g.Cg; ++c)
      for (int64_t i = 0; i < g.KH; ++i)
        for (int64_t j = 0; j < g.KW; ++j) {
          T* row = xt.data() + ((c * g.KH + i) * g.KW + j) * PB;
          for (int r = 0; r < nr; ++r) {
            const Run& run = runs[r];
            const int64_t ih = run.row * g.sh - g.ph + i * g.dh;
            if (ih < 0 || ih >= g.H) {
              zero_run(row + run.q0, run.len);
              continue;
            }
            const T* src = a.x + ((run.n * g.C + grp * g.Cg + c) * g.H + ih) * g.W;
            gather_run(row + run.q0, src, run.col0 * g.sw - g.pw + j * g.dw, g.sw, run.len, g.W);
          }
          zero_run(row + nq, PB - nq);
        }
    V sx[PR];
#pragma GCC unroll 4
    for (int v = 0; v < PR; ++v) sx[v] = V{};
    for (int64_t k = 0; k < K; ++k)
#pragma GCC unroll 4
      for (int v = 0; v < PR; ++v) sx[v] += vload<V>(xt.data() + k * PB + v * VW);

    for (int64_t ob = 0; ob < nob; ++ob) {
      const T* wp = a.wpack + ((grp * nob + ob) * K) * OR;
      V acc[OR][PR];
#pragma GCC unroll 16
      for (int r = 0; r < OR; ++r)
#pragma GCC unroll 4
        for (int v = 0; v < PR; ++v) acc[r][v] = V{};
      const T* xk = xt.data();
      for (int64_t k = 0; k < K; ++k, xk += PB, wp += OR) {
        V xv[PR];
#pragma GCC unroll 4
        for (int v = 0; v < PR; ++v) xv[v] = vload<V>(xk + v * VW);
#pragma GCC unroll 16
        for (int r = 0; r < OR; ++r) {
          const V wb = vbroadcast<V>(wp[r]);
#pragma GCC unroll 4
          for (int v = 0; v < PR; ++v) {
            if constexpr (kHasFma)
              acc[r][v] += vmin(wb, xv[v]) * one;
            else
              acc[r][v] += vmin(wb, xv[v]);
          }
        }
      }
      // sum_k |x - w| = sum_k x + sum_k w - 2 sum_k min(x, w); the output is its negative.
      const int64_t orows = std::min<int64_t>(OR, g.Og - ob * OR);
#pragma GCC unroll 16
      for (int r = 0; r < OR; ++r) {
        if (r < orows) {
          const V sw = vbroadcast<V>(a.sumw[grp * g.Og + ob * OR + r]);
#pragma GCC unroll 4
          for (int v = 0; v < PR; ++v) vstore<V>(out.data() + r * PB + v * VW, (acc[r][v] + acc[r][v]) - sx[v] - sw);
        }
      }
      for (int64_t r = 0; r < orows; ++r) {
        const int64_t o = grp * g.Og + ob * OR + r;
        for (int rr = 0; rr < nr; ++rr) {
          const Run& run = runs[rr];
          copy_run(a.y + (run.n * g.O + o) * L + run.row * g.OW + run.col0, out.data() + r * PB + run.q0, run.len);
        }
      }
    }
  }
}

// ------------------------------------------------------------------------------------------------ input grad
// With t = min(max(w, x - 1), x + 1) = clamp(w - x, -1, 1) + x, each pair costs max, min, fma instead of
// sub, min, max, fma: dX = sum g * t - x * sum g, where sum g (over taps and output channels) is per pixel.
template <typename T>
void input_grad_tasks(const InputGradArgs<T>& a, int64_t begin, int64_t end) {
  using V = typename Vec<T>::type;
  constexpr int VW = Vec<T>::width, PR = kPanelVectors, CR = kGradRows;
  constexpr int PB = VW * PR;
  const Geometry& g = a.g;
  const int64_t HW = g.H * g.W, P = g.N * HW;
  const int64_t npan = (P + PB - 1) / PB, ncb = (g.Cg + CR - 1) / CR, khw = g.KH * g.KW;
  std::vector<T> xin(ncb * CR * PB), dxt(ncb * CR * PB), gt(g.Og * PB);
  Run runs[PB];
  const V one = vbroadcast<V>(T(1));
  for (int64_t task = begin; task < end; ++task) {
    const int64_t grp = task / npan, p0 = (task % npan) * PB;
    const int64_t nq = std::min<int64_t>(PB, P - p0);
    const int nr = make_runs(p0, nq, g.H, g.W, runs);
    zero_run(xin.data(), int64_t(xin.size()));
    zero_run(dxt.data(), int64_t(dxt.size()));
    for (int64_t c = 0; c < g.Cg; ++c)
      for (int r = 0; r < nr; ++r) {
        const Run& run = runs[r];
        copy_run(xin.data() + c * PB + run.q0, a.x + ((run.n * g.C + grp * g.Cg + c) * g.H + run.row) * g.W + run.col0,
                 run.len);
      }
    V sg[PR];
#pragma GCC unroll 4
    for (int v = 0; v < PR; ++v) sg[v] = V{};
    for (int64_t i = 0; i < g.KH; ++i)
      for (int64_t j = 0; j < g.KW; ++j) {
        // gt[o][q] = G[n, grp*Og + o, oh, ow] of the output position that sees pixel q through tap (i, j), else 0.
        bool any = false;
        for (int r = 0; r < nr; ++r) {
          const Run& run = runs[r];
          const int64_t ohs = run.row + g.ph - i * g.dh;    // = oh * sh when the tap reaches this row
          const int64_t ows0 = run.col0 + g.pw - j * g.dw;  // = ow * sw for the run's first pixel
          const bool row_ok = ohs >= 0 && ohs % g.sh == 0 && ohs / g.sh < g.OH;
          for (int64_t o = 0; o < g.Og; ++o) {
            T* dst = gt.data() + o * PB + run.q0;
            if (!row_ok) {
              zero_run(dst, run.len);
              continue;
            }
            const T* src = a.gout + ((run.n * g.O + grp * g.Og + o) * g.OH + ohs / g.sh) * g.OW;
            if (g.sw == 1) {
              gather_run(dst, src, ows0, 1, run.len, g.OW);
            } else {
              for (int64_t t = 0; t < run.len; ++t) {
                const int64_t ows = ows0 + t;
                dst[t] = (ows >= 0 && ows % g.sw == 0 && ows / g.sw < g.OW) ? src[ows / g.sw] : T(0);
              }
            }
          }
          any = any || (row_ok && std::max<int64_t>(ows0, 0) < std::min<int64_t>(ows0 + run.len, g.OW * g.sw));
        }
        if (!any) continue;
        for (int64_t o = 0; o < g.Og; ++o) {
          zero_run(gt.data() + o * PB + nq, PB - nq);
#pragma GCC unroll 4
          for (int v = 0; v < PR; ++v) sg[v] += vload<V>(gt.data() + o * PB + v * VW);
        }
        const T* wij = a.wpack + ((grp * khw + i * g.KW + j) * ncb) * g.Og * CR;
        for (int64_t cb = 0; cb < ncb; ++cb) {
          const T* wp = wij + cb * g.Og * CR;
          V lo[CR][PR], hi[CR][PR], acc[CR][PR];
#pragma GCC unroll 16
          for (int r = 0; r < CR; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < PR; ++v) {
              const V xv = vload<V>(xin.data() + (cb * CR + r) * PB + v * VW);
              lo[r][v] = xv - one;
              hi[r][v] = xv + one;
              acc[r][v] = vload<V>(dxt.data() + (cb * CR + r) * PB + v * VW);
            }
          const T* go = gt.data();
          for (int64_t o = 0; o < g.Og; ++o, go += PB, wp += CR) {
            V gv[PR];
#pragma GCC unroll 4
            for (int v = 0; v < PR; ++v) gv[v] = vload<V>(go + v * VW);
#pragma GCC unroll 16
            for (int r = 0; r < CR; ++r) {
              const V wb = vbroadcast<V>(wp[r]);
#pragma GCC unroll 4
              for (int v = 0; v < PR; ++v) acc[r][v] += gv[v] * vmin(vmax(wb, lo[r][v]), hi[r][v]);
            }
          }
#pragma GCC unroll 16
          for (int r = 0; r < CR; ++r)
#pragma GCC unroll 4
            for (int v = 0; v < PR; ++v) vstore<V>(dxt.data() + (cb * CR + r) * PB + v * VW, acc[r][v]);
        }
      }
    for (int64_t c = 0; c < g.Cg; ++c) {
#pragma GCC unroll 4
      for (int v = 0; v < PR; ++v) {
        T* d = dxt.data() + c * PB + v * VW;
        vstore<V>(d, vload<V>(d) - vload<V>(xin.data() + c * PB + v * VW) * sg[v]);
      }
      for (int r = 0; r < nr; ++r) {
        const Run& run = runs[r];
        copy_run(a.dx + ((run.n * g.C + grp * g.Cg + c) * g.H + run.row) * g.W + run.col0, dxt.data() + c * PB + run.q0,
                 run.len);
      }
    }
  }
}

// Entry points called from the (baseline-compiled) parallel_for bodies.
__attribute__((noinline)) void forward(const ForwardArgs<float>& a, int64_t b, int64_t e) { forward_tasks(a, b, e); }
__attribute__((noinline)) void forward(const ForwardArgs<double>& a, int64_t b, int64_t e) { forward_tasks(a, b, e); }
__attribute__((noinline)) void input_grad(const InputGradArgs<float>& a, int64_t b, int64_t e) {
  input_grad_tasks(a, b, e);
}
__attribute__((noinline)) void input_grad(const InputGradArgs<double>& a, int64_t b, int64_t e) {
  input_grad_tasks(a, b, e);
}
