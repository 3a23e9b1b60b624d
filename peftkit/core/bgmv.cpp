// Batched gather matrix-vector product for mixed-adapter batches on CPU: Punica's BGMV / SGMV (Chen et al. 2023,
// "Punica: Multi-Tenant LoRA Serving", https://github.com/punica-ai/punica) and S-LoRA's multi-size variant for
// adapters of different ranks in one padded bank (Sheng et al. 2024, https://github.com/S-LoRA/S-LoRA).
//
//   out[t] += (x[t] · down[s]ᵀ) · up[s],   s = slot_of_id[ids[t / L]]   (L = tokens per row = T / ids.numel())
//
// out [..., N] and x [..., K] with the same leading dimensions, T tokens in all (out is written in place, so it must
// be viewable as [T, N]).
//
// down: [S, R, K], up: [S, R, N] (last dimension contiguous; the first two strided, so both may be views of one
// packed bank); only the first ranks[s] <= R rows of slot s are read, and tokens of a slot of rank 0 (the base-only
// row, id -1) are skipped. An id of -1 takes the last entry of slot_of_id. Tokens are visited grouped by slot (a
// counting sort of the rows), in tiles of up to four tokens of one slot, so each adapter's factors are read from
// memory once per call and every factor vector loaded into registers serves up to four tokens, where a gather of
// the factors reads them once per row. At one token per row the call is bound by reading the factors from memory
// (a decode step reads every distinct adapter's factors once); while one slot computes, the next slot's factors are
// requested with software prefetches (measured in the serving Llama's decode step, 29 distinct adapters on all
// seven linears: 3.1-3.3 ms of kernel time per step without, 2.5-2.7 ms with; on the 6 x Linear(1024) MLP, whose
// factors mostly stay in cache, no difference beyond noise; benchmarks/README.md).
//
// Built at first use by peftkit/core/bgmv.py with the system C++ compiler and torch.utils.cpp_extension's include
// and library paths; no Python binding: the op is registered with the dispatcher as peftkit::bgmv_.

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

// One SIMD register's worth of lanes (64 bytes): a zmm register with AVX-512, two ymm with AVX2; GCC's vector
// extension picks the instructions the build enables.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(64)));
  static constexpr int lanes = 64 / sizeof(T);
};

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  std::memcpy(&v, p, sizeof(v));  // unaligned load
  return v;
}

template <typename T>
inline void store(T* p, typename Vec<T>::type v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
inline T hsum(typename Vec<T>::type v) {
  T s = 0;
  for (int i = 0; i < Vec<T>::lanes; ++i) s += v[i];
  return s;
}

// The next slot's factor rows, requested a few cache lines at a time while the current slot computes (as many lines
// as the current loop reads from memory), so its reads overlap this slot's arithmetic.
struct Prefetcher {
  const char* a = nullptr;  // first row of down / up of the next slot (nullptr: nothing left to request)
  const char* u = nullptr;
  int64_t a_row = 0, u_row = 0, a_bytes = 0, u_bytes = 0, rank = 0;
  int64_t row = 0, offset = 0;  // position: rows 0..rank-1 of down, then rank..2 rank-1 of up

  // Request rank rows of `row_bytes_a` bytes from `down` (row stride `stride_a`), then rank rows from `up`.
  inline void start(const char* down, int64_t stride_a, int64_t row_bytes_a, const char* up, int64_t stride_u,
                    int64_t row_bytes_u, int64_t rows) {
    a = rows > 0 ? down : nullptr, u = up;
    a_row = stride_a, u_row = stride_u, a_bytes = row_bytes_a, u_bytes = row_bytes_u, rank = rows;
    row = 0, offset = 0;
  }

  inline void next(int64_t lines) {
    while (lines-- > 0 && a != nullptr) {
      const bool in_down = row < rank;
      const char* p = in_down ? a + row * a_row + offset : u + (row - rank) * u_row + offset;
      __builtin_prefetch(p, 0, 3);
      offset += 64;
      if (offset >= (in_down ? a_bytes : u_bytes)) {
        offset = 0;
        if (++row >= 2 * rank) a = nullptr;
      }
    }
  }
};

// Tiles of TB tokens (all of one slot) × RB rows of the factor: every vector of the factor loaded from cache
// serves TB tokens, so the tokens of one adapter share each read (the SGMV idea on CPU).

// h[t][r] = x_t · a_r for the TB tokens and rows r0 .. r0+RB-1 (a_r = a + r * a_row).
template <typename T, int TB, int RB>
inline void shrink_tile(const T* const* xs, const T* a, int64_t a_row, int64_t r0, int64_t k, T* h, int64_t h_row,
                        Prefetcher& pf) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  const int64_t k_vec = k - k % L;
  V acc[TB][RB] = {};
  for (int64_t i = 0; i < k_vec; i += L) {
    V xv[TB];
    for (int t = 0; t < TB; ++t) xv[t] = load(xs[t] + i);
    pf.next(RB);
    for (int r = 0; r < RB; ++r) {
      const V av = load(a + (r0 + r) * a_row + i);
      for (int t = 0; t < TB; ++t) acc[t][r] += xv[t] * av;
    }
  }
  for (int t = 0; t < TB; ++t) {
    for (int r = 0; r < RB; ++r) {
      const T* ar = a + (r0 + r) * a_row;
      T sum = hsum<T>(acc[t][r]);
      for (int64_t i = k_vec; i < k; ++i) sum += xs[t][i] * ar[i];
      h[t * h_row + r0 + r] = sum;
    }
  }
}

// y_t += Σ_r h[t][r] · u_r for the TB tokens (u_r = u + r * u_row).
template <typename T, int TB>
inline void expand_tile(T* const* ys, const T* h, int64_t h_row, const T* u, int64_t u_row, int64_t rank, int64_t n,
                        Prefetcher& pf) {
  using V = typename Vec<T>::type;
  constexpr int L = Vec<T>::lanes;
  int64_t i = 0;
  for (; i + 2 * L <= n; i += 2 * L) {
    V y[TB][2];
    for (int t = 0; t < TB; ++t) y[t][0] = load(ys[t] + i), y[t][1] = load(ys[t] + i + L);
    pf.next(2 * rank);
    for (int64_t r = 0; r < rank; ++r) {
      const V u0 = load(u + r * u_row + i), u1 = load(u + r * u_row + i + L);
      for (int t = 0; t < TB; ++t) {
        const T c = h[t * h_row + r];
        y[t][0] += c * u0;
        y[t][1] += c * u1;
      }
    }
    for (int t = 0; t < TB; ++t) store(ys[t] + i, y[t][0]), store(ys[t] + i + L, y[t][1]);
  }
  for (int t = 0; t < TB; ++t) {
    for (int64_t j = i; j < n; ++j) {
      T acc = ys[t][j];
      for (int64_t r = 0; r < rank; ++r) acc += h[t * h_row + r] * u[r * u_row + j];
      ys[t][j] = acc;
    }
  }
}

// TB tokens of one slot: shrink in tiles of 4 factor rows (then 1), expand.
template <typename T, int TB>
inline void tokens_of_slot(const T* const* xs, T* const* ys, const T* a, int64_t a_row, const T* u, int64_t u_row,
                           int64_t rank, int64_t k, int64_t n, T* h, int64_t h_row, Prefetcher& pf) {
  int64_t r = 0;
  for (; r + 4 <= rank; r += 4) shrink_tile<T, TB, 4>(xs, a, a_row, r, k, h, h_row, pf);
  for (; r < rank; ++r) shrink_tile<T, TB, 1>(xs, a, a_row, r, k, h, h_row, pf);
  expand_tile<T, TB>(ys, h, h_row, u, u_row, rank, n, pf);
}

template <typename T>
void run(at::Tensor& out, const at::Tensor& x, const at::Tensor& down, const at::Tensor& up,
         const std::vector<int64_t>& order, const std::vector<int64_t>& order_slot, const int64_t* ranks) {
  constexpr int TB = 4;
  const int64_t k = x.size(1), n = out.size(1), max_rank = down.size(1);
  T* out_p = out.data_ptr<T>();
  const T* x_p = x.const_data_ptr<T>();
  const T* down_p = down.const_data_ptr<T>();
  const T* up_p = up.const_data_ptr<T>();
  const int64_t out_s = out.stride(0), x_s = x.stride(0);
  const int64_t d_s0 = down.stride(0), d_s1 = down.stride(1), u_s0 = up.stride(0), u_s1 = up.stride(1);
  const int64_t count = static_cast<int64_t>(order.size());
  // ~64k multiply-adds per task: below that, waking a second thread costs more than it saves
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, max_rank * (k + n)));
  at::parallel_for(0, count, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> h(static_cast<size_t>(TB * max_rank));
    const T* xs[TB];
    T* ys[TB];
    int64_t j = begin;
    Prefetcher pf;
    int64_t current = -1;  // the slot being computed (its successor's factors are what pf requests)
    while (j < end) {
      const int64_t s = order_slot[j];
      int64_t nt = 1;  // tokens of slot s from j on, at most TB
      while (nt < TB && j + nt < end && order_slot[j + nt] == s) ++nt;
      if (s != current) {  // a new slot: request the next one's factors meanwhile (none after the last)
        int64_t next = j + nt;
        while (next < end && order_slot[next] == s) ++next;
        const int64_t q = next < end ? order_slot[next] : s;
        pf.start(reinterpret_cast<const char*>(down_p + q * d_s0), d_s1 * sizeof(T), k * sizeof(T),
                 reinterpret_cast<const char*>(up_p + q * u_s0), u_s1 * sizeof(T), n * sizeof(T),
                 next < end ? ranks[q] : 0);
        current = s;
      }
      for (int64_t i = 0; i < nt; ++i) xs[i] = x_p + order[j + i] * x_s, ys[i] = out_p + order[j + i] * out_s;
      const T* a = down_p + s * d_s0;
      const T* u = up_p + s * u_s0;
      const int64_t rank = ranks[s];
      switch (nt) {
        case 4: tokens_of_slot<T, 4>(xs, ys, a, d_s1, u, u_s1, rank, k, n, h.data(), max_rank, pf); break;
        case 3: tokens_of_slot<T, 3>(xs, ys, a, d_s1, u, u_s1, rank, k, n, h.data(), max_rank, pf); break;
        case 2: tokens_of_slot<T, 2>(xs, ys, a, d_s1, u, u_s1, rank, k, n, h.data(), max_rank, pf); break;
        default: tokens_of_slot<T, 1>(xs, ys, a, d_s1, u, u_s1, rank, k, n, h.data(), max_rank, pf); break;
      }
      j += nt;
    }
  });
}

void bgmv_(at::Tensor out_nd, const at::Tensor& x_nd, const at::Tensor& down, const at::Tensor& up,
           const at::Tensor& ids, const at::Tensor& slot_of_id, const at::Tensor& ranks) {
  TORCH_CHECK(out_nd.dim() >= 1 && x_nd.dim() >= 1 && down.dim() == 3 && up.dim() == 3,
              "bgmv_: out [..., N], x [..., K], down [S, R, K], up [S, R, N]");
  // Leading dimensions flattened here rather than by the caller (a layer's [B, L, N] output is written in place
  // through the view): one call per adapted module per step, so Python-side reshapes would cost more than the op.
  at::Tensor out = out_nd.dim() == 2 ? out_nd : out_nd.view({-1, out_nd.size(-1)});
  at::Tensor x = x_nd.reshape({-1, x_nd.size(-1)});
  if (x.stride(1) != 1) x = x.contiguous();
  TORCH_CHECK(out.device().is_cpu() && x.device().is_cpu() && down.device().is_cpu() && up.device().is_cpu(),
              "bgmv_: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && down.scalar_type() == out.scalar_type() &&
                  up.scalar_type() == out.scalar_type(),
              "bgmv_: out, x, down and up must share one dtype");
  const int64_t tokens = out.size(0), k = x.size(1), n = out.size(1), count = down.size(0), rank = down.size(1);
  const int64_t rows = ids.numel(), known = slot_of_id.numel();
  TORCH_CHECK(x.size(0) == tokens, "bgmv_: out has ", tokens, " tokens, x ", x.size(0));
  TORCH_CHECK(rows > 0 ? tokens % rows == 0 : tokens == 0, "bgmv_: ", tokens, " tokens in ", rows, " rows");
  TORCH_CHECK(down.size(2) == k && up.size(2) == n && up.size(0) == count && up.size(1) == rank,
              "bgmv_: down / up shapes do not match x / out");
  TORCH_CHECK(ranks.numel() == count, "bgmv_: ranks needs one entry per slot");
  TORCH_CHECK(out.stride(1) == 1 && x.stride(1) == 1 && down.stride(2) == 1 && up.stride(2) == 1,
              "bgmv_: the last dimension of every matrix must be contiguous");
  for (const at::Tensor* t : {&ids, &slot_of_id, &ranks}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous() && t->device().is_cpu(),
                "bgmv_: ids, slot_of_id and ranks are contiguous int64 CPU tensors");
  }
  if (tokens == 0) return;
  const int64_t per_row = tokens / rows;
  const int64_t* id_p = ids.const_data_ptr<int64_t>();
  const int64_t* slot_p = slot_of_id.const_data_ptr<int64_t>();
  const int64_t* rank_p = ranks.const_data_ptr<int64_t>();
  for (int64_t s = 0; s < count; ++s) {
    TORCH_CHECK(rank_p[s] >= 0 && rank_p[s] <= rank, "bgmv_: ranks[", s, "] = ", rank_p[s], " outside [0, ", rank, "]");
  }
  // Each row's slot, then a counting sort of the rows by slot (stable), leaving out slots of rank 0.
  std::vector<int64_t> start(static_cast<size_t>(count) + 1, 0);
  std::vector<int64_t> row_slot(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t id = id_p[r];
    TORCH_CHECK(id >= -1 && id < known - 1, "bgmv_: adapter id ", id, " outside [-1, ", known - 1, ")");
    const int64_t s = slot_p[id < 0 ? known - 1 : id];
    TORCH_CHECK(s >= 0 && s < count, "bgmv_: slot ", s, " of adapter id ", id, " outside [0, ", count, ")");
    row_slot[r] = s;
    if (rank_p[s] > 0) ++start[s + 1];
  }
  for (int64_t s = 0; s < count; ++s) start[s + 1] += start[s];
  std::vector<int64_t> order(static_cast<size_t>(start[count] * per_row));  // token indices, grouped by slot
  std::vector<int64_t> order_slot(order.size());
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = row_slot[r];
    if (rank_p[s] == 0) continue;
    const int64_t first = start[s]++ * per_row;
    for (int64_t j = 0; j < per_row; ++j) order[first + j] = r * per_row + j, order_slot[first + j] = s;
  }
  if (order.empty()) return;
  if (out.scalar_type() == at::kFloat) {
    run<float>(out, x, down, up, order, order_slot, rank_p);
  } else if (out.scalar_type() == at::kDouble) {
    run<double>(out, x, down, up, order, order_slot, rank_p);
  } else {
    TORCH_CHECK(false, "bgmv_: float32 and float64 only, got ", out.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(peftkit, m) {
  m.def(
      "bgmv_(Tensor(a!) out, Tensor x, Tensor down, Tensor up, Tensor ids, Tensor slot_of_id, Tensor ranks) -> ()");
}

TORCH_LIBRARY_IMPL(peftkit, CPU, m) { m.impl("bgmv_", bgmv_); }
