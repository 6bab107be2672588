// Helpers of the built-in dense-LSTM kernels (T-BPTT, UORO, SnAp-1) and eLSTM: the gates of
// one LSTM unit, and the chunked row sweeps over sensitivities, traces and weights.
//
// The big arrays (sensitivities or the parameter tangent, traces, weights, optimiser state)
// are swept once, in chunks of weight rows: per chunk, every stream in turn (each stream's
// chunk is one contiguous run of its arrays), the update of a shared weight summed over the
// streams in cache. Threads split the chunks (rows) or the streams, never a sum.

#pragma once

#include <agentstate/engine.h>

namespace {

// One LSTM unit's step from its pre-activations and previous cell: the new cell and output,
// and the derivatives T-BPTT keeps for the backward pass.
template <typename T>
struct LstmGates {
  T kappa_i, kappa_f, kappa_g;  // dc/da for the input, forget and candidate gates
  T mu;                         // dh/dc = o (1 - tanh(c)^2)
  T dh_do;                      // dh/da_o = tanh(c) o (1 - o)
  T forget, c, h;
};

template <typename T>
inline LstmGates<T> lstm_gates(T a_i, T a_f, T a_g, T a_o, T c_prev) {
  const T i_gate = sigmoid(a_i), f_gate = sigmoid(a_f);
  const T candidate = vector_tanh(a_g), o_gate = sigmoid(a_o);
  const T c_new = f_gate * c_prev + i_gate * candidate;
  const T tanh_c = vector_tanh(c_new);
  LstmGates<T> gates;
  gates.kappa_i = candidate * i_gate * (T(1) - i_gate);
  gates.kappa_f = c_prev * f_gate * (T(1) - f_gate);
  gates.kappa_g = i_gate * (T(1) - candidate * candidate);
  gates.mu = o_gate * (T(1) - tanh_c * tanh_c);
  gates.dh_do = tanh_c * o_gate * (T(1) - o_gate);
  gates.forget = f_gate;
  gates.c = c_new;
  gates.h = o_gate * tanh_c;
  return gates;
}

// Gates computed across streams go in blocks of this many (whole vectors, see td_window).
constexpr index GATE_LANES = 8;

// Weight rows per chunk of a sweep: about 16 K entries, so a shared chunk's update sum stays
// in cache while every stream adds to it.
constexpr index CHUNK_ENTRIES = index(1) << 14;

// Rows shorter than this go through a sweep body's scratch (see sweep_rows); longer ones
// vectorise on their own, and the extra pass over the scratch would only cost.
constexpr index SHORT_ROW = 64;

// Staged short rows are written in whole vectors of this many entries (see stage_outer).
constexpr index STAGING_LANES = 8;

// out[r * width + i] = scale[r] * values[i] for r < rows, i < width, in whole blocks of
// STAGING_LANES entries (no scalar remainder per row): a row's last block spills into the
// next row, which then overwrites it. The last row's spill needs STAGING_LANES - 1 entries
// of slack past out's rows, and values as many readable entries past width.
template <typename T>
inline void stage_outer(T* __restrict out, const T* __restrict scale, index rows,
                        const T* __restrict values, index width) {
  for (index r = 0; r < rows; ++r) {
    T* __restrict row = out + r * width;
    const T s = scale[r];
    for (index i = 0; i < width; i += STAGING_LANES) {
#pragma omp simd
      for (index l = 0; l < STAGING_LANES; ++l) row[i + l] = s * values[i + l];
    }
  }
}

// out[b * rows + r] = weight_p[r] . input_b (+ offset_p[r]) for every stream b (or, with
// `out_by_row` set, out[r * out_by_row + b]: rows of streams), with weight
// row r at weight + (p * rows + r) * row_stride (the first `width` entries are used) and, if
// given, masked by row r % mask_rows of `mask` ([mask_rows, width], 0 or 1: only one masked
// row at a time is formed). Shared weights go row by row, each weight times the inputs of
// every stream (the inputs transposed to [width, B]) in combine_columns' register blocks;
// every sum runs over the row in order.
template <typename T, typename E>
void matvec_all_streams(const E& engine, const T* weight, index row_stride,
                        const T* offset, index rows, index width, const T* input,
                        index input_stride, T* out, index out_by_row = 0,
                        const T* mask = nullptr, index mask_rows = 1) {
  const index B = engine.B;
  const index out_stream = out_by_row ? 1 : rows, out_row = out_by_row ? out_by_row : 1;
  auto weight_at = [&](const T* row, index r, index i) {
    return mask ? row[i] * mask[(r % mask_rows) * width + i] : row[i];
  };
  // Shared weights: across streams for short or masked rows; long unmasked rows take the
  // per-stream dot products below (the across-streams sums stall on their accumulators).
  if (engine.P == 1 && (width <= ACROSS_STREAMS_MAX_WIDTH || mask)) {
    parallel_for(rows, threads_for(engine.td, B * rows * width, rows), [&](index first, index last) {
      std::vector<T> by_entry(width * B), masked_row(mask ? width : 0), sum(B);
      for (index b = 0; b < B; ++b)
        for (index i = 0; i < width; ++i) by_entry[i * B + b] = input[b * input_stride + i];
      for (index r = first; r < last; ++r) {
        const T* row = weight + r * row_stride;
        if (mask) {
          for (index i = 0; i < width; ++i) masked_row[i] = weight_at(row, r, i);
          row = masked_row.data();
        }
        combine_columns(sum.data(), B, row, width, index(1), by_entry.data(), width, B);
        for (index b = 0; b < B; ++b) {
          out[b * out_stream + r * out_row] = offset ? sum[b] + offset[r] : sum[b];
        }
      }
    });
    return;
  }
  parallel_for(B, threads_for(engine.td, B * rows * width, B), [&](index first, index last) {
    for (index b = first; b < last; ++b) {
      const T* __restrict z = input + b * input_stride;
      for (index r = 0; r < rows; ++r) {
        const T* __restrict row = weight + ((engine.P == 1 ? 0 : b) * rows + r) * row_stride;
        T sum = 0;
        if (mask) {
          for (index i = 0; i < width; ++i) sum += weight_at(row, r, i) * z[i];
        } else {
          sum = dot(row, z, width);
        }
        out[b * out_stream + r * out_row] =
            offset ? sum + offset[(engine.P == 1 ? 0 : b) * rows + r] : sum;
      }
    }
  });
}

// The sweep over `rows` weight rows of `row_entries` update entries each: per chunk of rows,
// body(b, first_row, last_row, update, scratch) for every stream b, adding the TD update of
// those rows to `update` (rows in chunk x row_entries, laid out as the body and apply agree);
// apply(p, first_row, last_row, update, divisor) then steps the optimiser: once per chunk with
// the sum over streams (shared parameters, divisor B: the mean), or after each stream's body
// (independent ones, p = b). `scratch` (as large as `update`) is the thread's own: a body
// stages per-row products there so that its trace and update loops run over the whole chunk
// at once (rows of a small network are too short to vectorise one by one); it has
// STAGING_LANES entries of slack for stage_outer.
template <typename E, typename Body, typename Apply>
void sweep_rows(const E& engine, index rows, index row_entries, index work, bool train,
                const Body& body, const Apply& apply) {
  using T = typename E::value_type;
  const index B = engine.B, P = engine.P;
  const index threads = threads_for(engine.td, work, rows);
  const index chunk = std::max<index>(
      1, std::min({rows, CHUNK_ENTRIES / row_entries, (rows + threads - 1) / threads}));
  const index chunks = (rows + chunk - 1) / chunk;
  parallel_for(chunks, threads, [&](index first_chunk, index last_chunk) {
    std::vector<T> update(train ? chunk * row_entries : 0);
    std::vector<T> scratch(chunk * row_entries + STAGING_LANES);
    for (index at = first_chunk; at < last_chunk; ++at) {
      const index first = at * chunk, last = std::min(rows, first + chunk);
      const index count = (last - first) * row_entries;
      if (train && P == 1) std::fill_n(update.data(), count, T(0));
      for (index b = 0; b < B; ++b) {
        if (train && P != 1) std::fill_n(update.data(), count, T(0));
        body(b, first, last, update.data(), scratch.data());
        if (train && P != 1) apply(b, first, last, update.data(), T(1));
      }
      if (train && P == 1) apply(index(0), first, last, update.data(), T(B));
    }
  });
}

// float32 tanh and exp through double, so rounded correctly (nearly always) as torch's
// 1-ulp float32 functions nearly always are: fused and eager trajectories then stay together
// (a recurrence like eLSTM's amplifies a last-bit difference in its gates). The sigmoid is
// torch's 1 / (1 + exp(-a)), rounded in float32 after the exponential.
inline float rounded_tanh(float a) { return float(vector_tanh(double(a))); }
inline double rounded_tanh(double a) { return vector_tanh(a); }
inline float rounded_sigmoid(float a) { return 1.0f / (1.0f + float(vector_exp(-double(a)))); }
inline double rounded_sigmoid(double a) { return sigmoid(a); }

// a b + c rounded once, as torch's addcmul and lerp compute it on a CPU with fused
// multiply-adds (their vector kernels contract it); rounded twice elsewhere, as there.
template <typename T>
inline T multiply_add(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// torch.lerp(start, end, weight) as ATen's vectorised CPU kernel computes it: a
// multiply-add from the nearer end.
template <typename T>
inline T lerp(T start, T end, T weight) {
  const bool small = std::abs(weight) < T(0.5);
  return multiply_add(small ? weight : weight - T(1), end - start, small ? start : end);
}

}  // namespace
