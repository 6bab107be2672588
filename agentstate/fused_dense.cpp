// Fused TD(lambda) steps of the learners whose state is not columnar: eLSTM, UORO, SnAp-1.
//
// Compiled by agentstate/fused.py in the same translation unit, after fused_td.cpp: this
// file uses its Engine (normalisation, heads, TD error, v), ParameterOptimizer, threads_for,
// parallel_for, sigmoid, vector_exp, vector_tanh and dot. Each entry point does what TDPredictor.step
// does eagerly (agentstate/td.py), in its order:
//
//   learner step with the old weights (its credit memory advanced: sensitivities or
//   tangents); heads, delta; optimiser steps from the old traces; learner_trace =
//   gamma lambda learner_trace + grad_learner(v) with v from the updated heads.
//
// The big arrays (sensitivities or the parameter tangent, traces, weights, optimiser state)
// are swept once, in chunks of weight rows: per chunk, every stream in turn (each stream's
// chunk is one contiguous run of its arrays), the update of a shared weight summed over the
// streams in cache. Threads split the chunks (rows) or the streams, never a sum.

namespace {

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
template <typename T>
void matvec_all_streams(const Engine<T>& engine, const T* weight, index row_stride,
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
template <typename T, typename Body, typename Apply>
void sweep_rows(const Engine<T>& engine, index rows, index row_entries, index work, bool train,
                const Body& body, const Apply& apply) {
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

// ------------------------------------------------------------------ eLSTM
// plugins/elstm.py. Parameters in ElementwiseCells order.
enum ElementwiseParameter : index {
  GATE_INPUT_WEIGHT = 0, GATE_CELL_WEIGHT, GATE_BIAS, OUTPUT_WEIGHT, OUTPUT_BIAS, N_PARAMETERS
};

template <typename T>
int td_elstm(const TDArgs& td, const ElementwiseArgs& cells) {
  Engine<T> engine(td);
  if (!engine.inputs_finite()) return 1;
  const index B = engine.B, P = engine.P, D = engine.d, N = engine.n, K = engine.K;
  const index rows = 2 * N;        // gate rows (g, n): z then f
  const index width = D + 2;       // a sensitivity row: [W_g[n], w_g[n], b_g[n]]
  const index output_width = D + N;  // W_o acts on [x; c]
  auto** parameters = reinterpret_cast<T**>(cells.parameters);
  auto** traces = reinterpret_cast<T**>(cells.parameter_traces);
  T* gate_input_weight = parameters[GATE_INPUT_WEIGHT];  // [P, 2, N, D]
  T* gate_cell_weight = parameters[GATE_CELL_WEIGHT];    // [P, 2, N]
  T* gate_bias = parameters[GATE_BIAS];                  // [P, 2, N]
  T* output_weight = parameters[OUTPUT_WEIGHT];          // [P, N, D + N]
  T* output_bias = parameters[OUTPUT_BIAS];              // [P, N]
  auto* c_carry = static_cast<T*>(cells.c);                   // [B, N]
  auto* sensitivity = static_cast<T*>(cells.sensitivity);     // [B, 2, N, D + 2]
  auto* output_gate = static_cast<T*>(cells.output_gate);     // [B, N]

  engine.normalize_observation();
  const T* x = engine.observation.data();
  std::copy_n(x, B * D, static_cast<T*>(cells.last_input));

  // The cell with the weights before this step's update, across the streams: the arrays
  // below (the sweep's kappa, dc_t/dc_t-1 and c_t-1 too) are [units or gate rows, lanes], the
  // streams padded to whole vectors of GATE_LANES so that a stream's tanh and exp never fall
  // in a scalar remainder (see td_window).
  const index lanes = (B + GATE_LANES - 1) / GATE_LANES * GATE_LANES;
  std::vector<T> preactivation(rows * lanes, T(0));  // W_g x + b_g
  matvec_all_streams(engine, gate_input_weight, D, gate_bias, rows, D, x, D,
                     preactivation.data(), lanes);
  std::vector<T> cell_weight(rows * lanes, T(0)), c_prev(N * lanes, T(0)), c_new(N * lanes);
  for (index b = 0; b < B; ++b) {
    const T* w = gate_cell_weight + (P == 1 ? 0 : b) * rows;
    for (index r = 0; r < rows; ++r) cell_weight[r * lanes + b] = w[r];
    for (index i = 0; i < N; ++i) c_prev[i * lanes + b] = c_carry[b * N + i];
  }
  std::vector<T> kappa(rows * lanes), dc_dc_prev(N * lanes);
  for (index i = 0; i < N; ++i) {
    for (index block = i * lanes; block < (i + 1) * lanes; block += GATE_LANES) {
      const T* __restrict a_z = preactivation.data() + block;
      const T* __restrict a_f = a_z + N * lanes;
      const T* __restrict w_z = cell_weight.data() + block;
      const T* __restrict w_f = w_z + N * lanes;
      const T* __restrict c_old = c_prev.data() + block;
      T* __restrict kappa_z = kappa.data() + block;
      T* __restrict kappa_f = kappa_z + N * lanes;
      T* __restrict decay = dc_dc_prev.data() + block;
      T* __restrict c_t = c_new.data() + block;
      T candidate[GATE_LANES], forget[GATE_LANES];
      // The gates in a loop of their own: it vectorises, calling the vector tanh and exp.
#pragma omp simd
      for (index l = 0; l < GATE_LANES; ++l) {
        candidate[l] = rounded_tanh(multiply_add(w_z[l], c_old[l], a_z[l]));
        forget[l] = rounded_sigmoid(multiply_add(w_f[l], c_old[l], a_f[l]));
      }
#pragma omp simd
      for (index l = 0; l < GATE_LANES; ++l) {
        c_t[l] = lerp(candidate[l], c_old[l], forget[l]);  // f c_t-1 + (1 - f) z
        const T one_minus_forget = T(1) - forget[l];
        kappa_z[l] = one_minus_forget * (T(1) - candidate[l] * candidate[l]);
        kappa_f[l] = (c_old[l] - candidate[l]) * forget[l] * one_minus_forget;
        decay[l] = multiply_add(kappa_f[l], w_f[l], multiply_add(kappa_z[l], w_z[l], forget[l]));
      }
    }
  }
  // [x; c_t]: [B, D + N], and slack for stage_outer.
  std::vector<T> output_input(B * output_width + STAGING_LANES);
  for (index b = 0; b < B; ++b) {
    std::copy_n(x + b * D, D, output_input.data() + b * output_width);
    for (index i = 0; i < N; ++i) output_input[b * output_width + D + i] = c_new[i * lanes + b];
  }
  std::vector<T> output_preactivation(N * lanes, T(0)), o(N * lanes), h(B * N);
  matvec_all_streams(engine, output_weight, output_width, output_bias, N, output_width,
                     output_input.data(), output_width, output_preactivation.data(), lanes);
  for (index block = 0; block < N * lanes; block += GATE_LANES) {
    const T* __restrict a_o = output_preactivation.data() + block;
    T* __restrict o_block = o.data() + block;
#pragma omp simd
    for (index l = 0; l < GATE_LANES; ++l) o_block[l] = rounded_sigmoid(a_o[l]);
  }
  for (index b = 0; b < B; ++b)
    for (index i = 0; i < N; ++i) {
      const T o_t = o[i * lanes + b], c_t = c_new[i * lanes + b];
      output_gate[b * N + i] = o_t;
      h[b * N + i] = o_t * c_t;
      c_carry[b * N + i] = c_t;
    }

  engine.predict(h.data());
  engine.update_heads();
  engine.learner_state_weight();

  const bool train = td.train_learner;
  std::vector<std::optional<ParameterOptimizer<T>>> optimizers(N_PARAMETERS);
  std::vector<T> cell_weight_v;  // v . dh_t/dc_t: [B, K, N]
  if (train) {
    auto** states_a = reinterpret_cast<void**>(cells.parameter_states_a);
    auto** states_b = reinterpret_cast<void**>(cells.parameter_states_b);
    auto** steps = reinterpret_cast<void**>(cells.parameter_steps);
    for (index k = 0; k < N_PARAMETERS; ++k) {
      optimizers[k].emplace(td.optimizer, td.learner_lr, states_a[k], states_b[k], steps[k]);
    }
    // e = v . dh_t/da_o = v o (1 - o) c_t, and v o: [B, K, N].
    std::vector<T> output_v(B * K * N), v_output(B * K * N);
    for (index b = 0; b < B; ++b)
      for (index q = 0; q < K; ++q)
        for (index i = 0; i < N; ++i) {
          const T o = output_gate[b * N + i];
          v_output[(b * K + q) * N + i] = engine.v(b, q, i) * o;
          output_v[(b * K + q) * N + i] =
              v_output[(b * K + q) * N + i] * (T(1) - o) * output_input[b * output_width + D + i];
        }

    // W_o, b_o: update from the old traces, then trace = decay trace + e [x; c_t]^T, e.
    // The update of a chunk is [rows, D + N] (W_o) then [rows] (b_o).
    const ParameterOptimizer<T>& output_optimizer = *optimizers[OUTPUT_WEIGHT];
    const ParameterOptimizer<T>& output_bias_optimizer = *optimizers[OUTPUT_BIAS];
    T* output_trace = traces[OUTPUT_WEIGHT];     // [K, B, N, D + N]
    T* output_bias_trace = traces[OUTPUT_BIAS];  // [K, B, N]
    sweep_rows(
        engine, N, output_width + 1, B * N * output_width * (K + 1), true,
        [&](index b, index first, index last, T* update, T* scratch) {
          const index count = last - first, entries = count * output_width;
          const T* __restrict z = output_input.data() + b * output_width;
          const T decay = engine.trace_decay[b];
          for (index q = 0; q < K; ++q) {
            const T error = engine.delta[b * K + q];
            const T* __restrict e_rows = output_v.data() + (b * K + q) * N + first;
            T* __restrict e = output_trace + ((q * B + b) * N + first) * output_width;
            T* __restrict u = update;
            if (output_width < SHORT_ROW) {  // e [x; c_t]^T staged, then one loop
              T* __restrict outer = scratch;
              stage_outer(outer, e_rows, count, z, output_width);
              for (index i = 0; i < entries; ++i) {
                u[i] += error * e[i];
                e[i] = e[i] * decay + outer[i];
              }
            } else {
              for (index r = 0; r < count; ++r) {
                const index at = r * output_width;
                for (index i = 0; i < output_width; ++i) {
                  u[at + i] += error * e[at + i];
                  e[at + i] = e[at + i] * decay + e_rows[r] * z[i];
                }
              }
            }
            T* __restrict e_bias = output_bias_trace + (q * B + b) * N + first;
            T* __restrict u_bias = update + entries;
            for (index r = 0; r < count; ++r) {
              u_bias[r] += error * e_bias[r];
              e_bias[r] = e_bias[r] * decay + e_rows[r];
            }
          }
        },
        [&](index p, index first, index last, const T* update, T divisor) {
          const index count = last - first;
          output_optimizer.apply(output_weight, (p * N + first) * output_width, update, divisor,
                                 count * output_width);
          output_bias_optimizer.apply(output_bias, p * N + first, update + count * output_width,
                                      divisor, count);
        });

    // v . dh_t/dc_t = v o + W_o[:, D:]^T e with the updated W_o, summed over rows in order.
    cell_weight_v.resize(B * K * N);
    const index pairs = B * K;
    parallel_for(pairs, threads_for(td, pairs * N * N, pairs), [&](index first, index last) {
      std::copy(v_output.begin() + first * N, v_output.begin() + last * N,
                cell_weight_v.begin() + first * N);
      auto add_row = [&](index pair, index r) {
        const T* __restrict w = output_weight + ((P == 1 ? 0 : pair / K) * N + r) * output_width + D;
        const T scale = output_v[pair * N + r];
        T* __restrict sum = cell_weight_v.data() + pair * N;
        for (index j = 0; j < N; ++j) sum[j] += scale * w[j];
      };
      if (P == 1) {  // each row of W_o read once for every stream
        for (index r = 0; r < N; ++r)
          for (index pair = first; pair < last; ++pair) add_row(pair, r);
      } else {
        for (index pair = first; pair < last; ++pair)
          for (index r = 0; r < N; ++r) add_row(pair, r);
      }
    });
  }

  // Gate rows: S = D_t S + kappa [x; c_t-1; 1]; update from the old traces; then
  // trace = decay trace + (v . dh_t/dc_t) S for W_g, w_g, b_g. The update of a chunk is
  // [rows, D] (W_g), then [rows] (w_g), then [rows] (b_g), as the traces lie.
  T* input_trace = traces[GATE_INPUT_WEIGHT];  // [K, B, 2, N, D]
  T* cell_trace = traces[GATE_CELL_WEIGHT];    // [K, B, 2, N]
  T* bias_trace = traces[GATE_BIAS];           // [K, B, 2, N]
  sweep_rows(
      engine, rows, width, B * rows * width * (train ? K + 1 : 1), train,
      [&](index b, index first, index last, T* update, T* scratch) {
        const index count = last - first;
        const T* __restrict x_b = x + b * D;
        const T decay = engine.trace_decay[b];
        // (v_q . dh_t/dc_t) S, laid out as the update: [rows, D], [rows], [rows].
        T* __restrict weighted_input = scratch;
        T* __restrict weighted_cell = scratch + count * D;
        T* __restrict weighted_bias = weighted_cell + count;
        // S moves row by row with q = 0's staging; then per q the update and trace loops.
        for (index q = 0; q < (train ? K : 1); ++q) {
          const T* __restrict g = train ? cell_weight_v.data() + (b * K + q) * N : nullptr;
          for (index r = 0; r < count; ++r) {
            const index unit = first + r < N ? first + r : first + r - N;
            T* __restrict s = sensitivity + (b * rows + first + r) * width;
            if (q == 0) {
              const T scale = dc_dc_prev[unit * lanes + b];
              const T kappa_r = kappa[(first + r) * lanes + b];
              for (index i = 0; i < D; ++i) s[i] = multiply_add(kappa_r, x_b[i], s[i] * scale);
              s[D] = multiply_add(kappa_r, c_prev[unit * lanes + b], s[D] * scale);
              s[D + 1] = s[D + 1] * scale + kappa_r;
            }
            if (!train) continue;
            const T g_r = g[unit];
            for (index i = 0; i < D; ++i) weighted_input[r * D + i] = g_r * s[i];
            weighted_cell[r] = g_r * s[D];
            weighted_bias[r] = g_r * s[D + 1];
          }
          if (!train) return;
          const T error = engine.delta[b * K + q];
          const index row = (q * B + b) * rows + first;
          T* __restrict e = input_trace + row * D;
          T* __restrict u = update;
          for (index i = 0; i < count * D; ++i) {
            u[i] += error * e[i];
            e[i] = e[i] * decay + weighted_input[i];
          }
          T* __restrict e_cell = cell_trace + row;
          T* __restrict e_bias = bias_trace + row;
          T* __restrict u_cell = update + count * D;
          T* __restrict u_bias = u_cell + count;
          for (index r = 0; r < count; ++r) {
            u_cell[r] += error * e_cell[r];
            e_cell[r] = e_cell[r] * decay + weighted_cell[r];
            u_bias[r] += error * e_bias[r];
            e_bias[r] = e_bias[r] * decay + weighted_bias[r];
          }
        }
      },
      [&](index p, index first, index last, const T* update, T divisor) {
        const index count = last - first, row = p * rows + first;
        optimizers[GATE_INPUT_WEIGHT]->apply(gate_input_weight, row * D, update, divisor,
                                             count * D);
        optimizers[GATE_CELL_WEIGHT]->apply(gate_cell_weight, row, update + count * D, divisor,
                                            count);
        optimizers[GATE_BIAS]->apply(gate_bias, row, update + count * D + count, divisor, count);
      });
  engine.finish();
  return 0;
}

// ------------------------------------------------------------------ UORO
// plugins/uoro.py on the dense LSTM of plugins/dense_lstm.py.
template <typename T>
int td_uoro(const TDArgs& td, const TangentArgs& uoro) {
  Engine<T> engine(td);
  if (!engine.inputs_finite()) return 1;
  const index B = engine.B, d = engine.d, n = engine.n, K = engine.K;
  const index m = d + n + 1, rows = N_GATES * n;
  auto* weight = static_cast<T*>(uoro.weight);                   // [P, 4, n, m]
  auto* h_carry = static_cast<T*>(uoro.h);                       // [B, n]
  auto* c_carry = static_cast<T*>(uoro.c);                       // [B, n]
  auto* tangent_h = static_cast<T*>(uoro.state_tangent_h);       // [B, n]
  auto* tangent_c = static_cast<T*>(uoro.state_tangent_c);       // [B, n]
  auto* parameter_tangent = static_cast<T*>(uoro.parameter_tangent);  // [B, 4, n, m]
  auto* sign_bits = static_cast<const int64_t*>(uoro.sign_bits);  // [B, 2n]
  const T epsilon = T(uoro.epsilon);
  const T noise_norm = T(std::sqrt(double(2 * n)) + uoro.epsilon);  // |nu| + eps

  engine.normalize_observation();

  // Norms of the parameter tangents before this step (one read of W~ per stream).
  std::vector<T> parameter_tangent_norm(B);
  parallel_for(B, threads_for(td, B * rows * m, B), [&](index first, index last) {
    for (index b = first; b < last; ++b) {
      const T* w = parameter_tangent + b * rows * m;
      parameter_tangent_norm[b] = std::sqrt(dot(w, w, rows * m));
    }
  });

  // The cell and U s~ (the recurrent block times the state tangent), old weights.
  std::vector<T> cell_input(B * m);  // z = [x^, h_t-1, 1]
  for (index b = 0; b < B; ++b) {
    std::copy_n(engine.observation.data() + b * d, d, cell_input.data() + b * m);
    std::copy_n(h_carry + b * n, n, cell_input.data() + b * m + d);
    cell_input[b * m + d + n] = T(1);
  }
  std::vector<T> preactivation(B * rows), recurrent_tangent(B * rows);
  matvec_all_streams(engine, weight, m, static_cast<const T*>(nullptr), rows, m,
                     cell_input.data(), m, preactivation.data());
  matvec_all_streams(engine, weight + d, m, static_cast<const T*>(nullptr), rows, n, tangent_h,
                     n, recurrent_tangent.data());

  // Per stream: derivatives, the pushed tangent s' (JVP), a = nu . d(h, c)/da (VJP), rho.
  std::vector<T> noise_preactivation(B * rows), rho_0(B), scaled_noise(B * rows);
  parallel_for(B, threads_for(td, B * rows * m, B), [&](index first, index last) {
    std::vector<T> dc_da(rows), dh_da(rows), pushed_h(n), pushed_c(n), forget(n), dh_dc(n);
    std::vector<T> noise_h(n), noise_c(n);
    for (index b = first; b < last; ++b) {
      const T* __restrict a = preactivation.data() + b * rows;
      T* __restrict c_b = c_carry + b * n;
      T* __restrict h_b = h_carry + b * n;
#pragma omp simd
      for (index i = 0; i < n; ++i) {
        const T i_gate = rounded_sigmoid(a[GATE_I * n + i]);
        const T f_gate = rounded_sigmoid(a[GATE_F * n + i]);
        const T candidate = rounded_tanh(a[GATE_G * n + i]);
        const T o_gate = rounded_sigmoid(a[GATE_O * n + i]);
        const T c_prev = c_b[i];
        const T c_new = multiply_add(i_gate, candidate, f_gate * c_prev);
        const T tanh_c = rounded_tanh(c_new);
        const T mu = o_gate * (T(1) - tanh_c * tanh_c);
        dc_da[GATE_I * n + i] = candidate * i_gate * (T(1) - i_gate);
        dc_da[GATE_F * n + i] = c_prev * f_gate * (T(1) - f_gate);
        dc_da[GATE_G * n + i] = i_gate * (T(1) - candidate * candidate);
        dc_da[GATE_O * n + i] = T(0);
        dh_da[GATE_I * n + i] = mu * dc_da[GATE_I * n + i];
        dh_da[GATE_F * n + i] = mu * dc_da[GATE_F * n + i];
        dh_da[GATE_G * n + i] = mu * dc_da[GATE_G * n + i];
        dh_da[GATE_O * n + i] = tanh_c * o_gate * (T(1) - o_gate);
        forget[i] = f_gate;
        dh_dc[i] = mu;
        c_b[i] = c_new;
        h_b[i] = o_gate * tanh_c;
      }
      const T* __restrict u_s = recurrent_tangent.data() + b * rows;
      const T* __restrict t_c = tangent_c + b * n;
      const int64_t* bits = sign_bits + b * 2 * n;
      T pushed_square = 0, noise_square = 0;
      for (index i = 0; i < n; ++i) {
        noise_h[i] = T(2 * bits[i] - 1);
        noise_c[i] = T(2 * bits[n + i] - 1);
        T jvp_h = dh_da[i] * u_s[i], jvp_c = dc_da[i] * u_s[i];
        for (index k = 1; k < N_GATES; ++k) {
          jvp_h += dh_da[k * n + i] * u_s[k * n + i];
          jvp_c += dc_da[k * n + i] * u_s[k * n + i];
        }
        pushed_h[i] = multiply_add(dh_dc[i] * forget[i], t_c[i], jvp_h);
        pushed_c[i] = multiply_add(forget[i], t_c[i], jvp_c);
        pushed_square += pushed_h[i] * pushed_h[i] + pushed_c[i] * pushed_c[i];
      }
      T* __restrict noise_a = noise_preactivation.data() + b * rows;
      for (index k = 0; k < N_GATES; ++k)
        for (index i = 0; i < n; ++i) {
          noise_a[k * n + i] =
              multiply_add(noise_c[i], dc_da[k * n + i], noise_h[i] * dh_da[k * n + i]);
          noise_square += noise_a[k * n + i] * noise_a[k * n + i];
        }
      const T* z = cell_input.data() + b * m;
      const T noise_vjp_norm = std::sqrt(noise_square) * std::sqrt(dot(z, z, m));
      const T pushed_norm = std::sqrt(pushed_square);
      rho_0[b] = std::sqrt(parameter_tangent_norm[b] / (pushed_norm + epsilon)) + epsilon;
      const T rho_1 = std::sqrt(noise_vjp_norm / noise_norm) + epsilon;
      T* __restrict new_h = tangent_h + b * n;
      T* __restrict new_c = tangent_c + b * n;
      for (index i = 0; i < n; ++i) {
        new_h[i] = multiply_add(rho_1, noise_h[i], rho_0[b] * pushed_h[i]);
        new_c[i] = multiply_add(rho_1, noise_c[i], rho_0[b] * pushed_c[i]);
      }
      for (index r = 0; r < rows; ++r) scaled_noise[b * rows + r] = noise_a[r] / rho_1;
    }
  });

  engine.predict(h_carry);
  engine.update_heads();
  engine.learner_state_weight();

  const bool train = td.train_learner;
  std::optional<ParameterOptimizer<T>> optimizer;
  std::vector<T> projection(B * K);  // v . h~_t
  if (train) {
    optimizer.emplace(engine.learner_optimizer());
    for (index b = 0; b < B; ++b)
      for (index q = 0; q < K; ++q) {
        T sum = 0;
        for (index i = 0; i < n; ++i) sum += engine.v(b, q, i) * tangent_h[b * n + i];
        projection[b * K + q] = sum;
      }
  }
  // W~ = W~ / rho_0 + (a / rho_1) z^T; update from the old traces; trace = decay trace + (v . h~) W~.
  auto* trace = static_cast<T*>(td.learner_trace);  // [K, B, 4, n, m]
  sweep_rows(
      engine, rows, m, B * rows * m * (train ? K + 2 : 2), train,
      [&](index b, index first, index last, T* update, T*) {
        const T* __restrict z = cell_input.data() + b * m;
        const T scale = rho_0[b];
        for (index r = first; r < last; ++r) {
          T* __restrict w = parameter_tangent + (b * rows + r) * m;
          const T a = scaled_noise[b * rows + r];
          for (index i = 0; i < m; ++i) w[i] = multiply_add(a, z[i], w[i] / scale);
        }
        if (!train) return;
        const index count = (last - first) * m;
        const T* __restrict w = parameter_tangent + (b * rows + first) * m;
        for (index q = 0; q < K; ++q) {
          const T error = engine.delta[b * K + q], decay = engine.trace_decay[b];
          const T g = projection[b * K + q];
          T* __restrict e = trace + ((q * B + b) * rows + first) * m;
          for (index i = 0; i < count; ++i) {
            update[i] += error * e[i];
            e[i] = e[i] * decay + g * w[i];
          }
        }
      },
      [&](index p, index first, index last, const T* update, T divisor) {
        optimizer->apply(weight, (p * rows + first) * m, update, divisor, (last - first) * m);
      });
  engine.finish();
  return 0;
}

// ------------------------------------------------------------------ SnAp-1
// plugins/snap1.py: the dense LSTM with its recurrent weights masked by M, and per unit the
// sensitivities of its own state to its own weights, S^h and S^c: [B, 4, n, m].
template <typename T>
int td_snap1(const TDArgs& td, const SnapArgs& snap) {
  Engine<T> engine(td);
  if (!engine.inputs_finite()) return 1;
  const index B = engine.B, P = engine.P, d = engine.d, n = engine.n, K = engine.K;
  const index m = d + n + 1, rows = N_GATES * n;
  auto* weight = static_cast<T*>(snap.weight);                // [P, 4, n, m]
  auto* h_carry = static_cast<T*>(snap.h);                    // [B, n]
  auto* c_carry = static_cast<T*>(snap.c);                    // [B, n]
  auto* sensitivity_h = static_cast<T*>(snap.sensitivity_h);  // [B, 4, n, m]
  auto* sensitivity_c = static_cast<T*>(snap.sensitivity_c);  // [B, 4, n, m]
  auto* mask = static_cast<const T*>(snap.weight_mask);       // [n, m]

  engine.normalize_observation();

  // The masked cell with the weights before this step's update.
  std::vector<T> cell_input(B * m);  // z = [x^, h_t-1, 1]
  for (index b = 0; b < B; ++b) {
    std::copy_n(engine.observation.data() + b * d, d, cell_input.data() + b * m);
    std::copy_n(h_carry + b * n, n, cell_input.data() + b * m + d);
    cell_input[b * m + d + n] = T(1);
  }
  std::vector<T> preactivation(B * rows);
  matvec_all_streams(engine, weight, m, static_cast<const T*>(nullptr), rows, m,
                     cell_input.data(), m, preactivation.data(), 0, mask, n);

  // Per stream and unit: kappa, dh/da, and the diagonal of the state Jacobian.
  std::vector<T> dc_da(B * rows), dh_da(B * rows), forget(B * n), dh_dc_prev(B * n);
  std::vector<T> dh_dh_prev(B * n), dc_dh_prev(B * n), gates(N_GATES * n), cell_tanh(n);
  for (index b = 0; b < B; ++b) {
    const T* __restrict a = preactivation.data() + b * rows;
    const T* __restrict w = weight + (P == 1 ? 0 : b) * rows * m;
    T* __restrict kappa = dc_da.data() + b * rows;
    T* __restrict dh = dh_da.data() + b * rows;
    T* __restrict c_b = c_carry + b * n;
    T* __restrict h_b = h_carry + b * n;
    // The gates and tanh(c_t) in loops of their own: they vectorise, calling the vector
    // tanh and exp.
    T* __restrict gate = gates.data();
    T* __restrict tanh_c_b = cell_tanh.data();
#pragma omp simd
    for (index r = 0; r < rows; ++r) gate[r] = rounded_sigmoid(a[r]);
#pragma omp simd
    for (index i = 0; i < n; ++i) gate[GATE_G * n + i] = rounded_tanh(a[GATE_G * n + i]);
#pragma omp simd
    for (index i = 0; i < n; ++i) {
      tanh_c_b[i] = rounded_tanh(multiply_add(gate[GATE_I * n + i], gate[GATE_G * n + i],
                                              gate[GATE_F * n + i] * c_b[i]));
    }
    for (index i = 0; i < n; ++i) {
      const T i_gate = gate[GATE_I * n + i], f_gate = gate[GATE_F * n + i];
      const T candidate = gate[GATE_G * n + i], o_gate = gate[GATE_O * n + i];
      const T c_prev = c_b[i];
      const T c_new = multiply_add(i_gate, candidate, f_gate * c_prev);
      const T tanh_c = tanh_c_b[i];
      const T mu = o_gate * (T(1) - tanh_c * tanh_c);
      kappa[GATE_I * n + i] = candidate * i_gate * (T(1) - i_gate);
      kappa[GATE_F * n + i] = c_prev * f_gate * (T(1) - f_gate);
      kappa[GATE_G * n + i] = i_gate * (T(1) - candidate * candidate);
      kappa[GATE_O * n + i] = T(0);
      for (index k = 0; k < GATE_O; ++k) dh[k * n + i] = mu * kappa[k * n + i];
      dh[GATE_O * n + i] = tanh_c * o_gate * (T(1) - o_gate);
      // (dh_t/dh_t-1)_ii = sum_k (dh_t/da_k)_i U_k[i, i], U the masked recurrent block.
      const T self_mask = mask[i * m + d + i];
      T own_h = 0, own_c = 0;
      for (index k = 0; k < N_GATES; ++k) {
        const T own = w[(k * n + i) * m + d + i] * self_mask;
        own_h += dh[k * n + i] * own;
        own_c += kappa[k * n + i] * own;
      }
      dh_dh_prev[b * n + i] = own_h;
      dc_dh_prev[b * n + i] = own_c;
      forget[b * n + i] = f_gate;
      dh_dc_prev[b * n + i] = mu * f_gate;
      c_b[i] = c_new;
      h_b[i] = o_gate * tanh_c;
    }
  }

  engine.predict(h_carry);
  engine.update_heads();
  engine.learner_state_weight();

  // S^c = (dc/dh_prev)_ii S^h + f S^c + kappa (z (.) M_i); S^h likewise with dh; update from
  // the old traces; trace = decay trace + v_i S^h.
  const bool train = td.train_learner;
  std::optional<ParameterOptimizer<T>> optimizer;
  if (train) optimizer.emplace(engine.learner_optimizer());
  auto* trace = static_cast<T*>(td.learner_trace);  // [K, B, 4, n, m]
  sweep_rows(
      engine, rows, m, B * rows * m * (train ? K + 2 : 2), train,
      [&](index b, index first, index last, T* update, T* scratch) {
        const T* __restrict z = cell_input.data() + b * m;
        for (index r = first; r < last; ++r) {
          const index unit = r % n;
          const T* __restrict mask_row = mask + unit * m;
          const T kappa = dc_da[b * rows + r], dh = dh_da[b * rows + r];
          const T c_from_h = dc_dh_prev[b * n + unit], c_from_c = forget[b * n + unit];
          const T h_from_h = dh_dh_prev[b * n + unit], h_from_c = dh_dc_prev[b * n + unit];
          T* __restrict sh = sensitivity_h + (b * rows + r) * m;
          T* __restrict sc = sensitivity_c + (b * rows + r) * m;
#pragma omp simd
          for (index j = 0; j < m; ++j) {
            const T masked_input = z[j] * mask_row[j];
            const T sc_new = multiply_add(kappa, masked_input,
                                          multiply_add(sc[j], c_from_c, sh[j] * c_from_h));
            sh[j] = multiply_add(dh, masked_input, multiply_add(sc[j], h_from_c, sh[j] * h_from_h));
            sc[j] = sc_new;
          }
        }
        if (!train) return;
        const index entries = (last - first) * m;
        const T* __restrict sh = sensitivity_h + (b * rows + first) * m;
        T* __restrict weighted = scratch;  // v_i S^h: [rows, m]
        const T decay = engine.trace_decay[b];
        for (index q = 0; q < K; ++q) {
          const T error = engine.delta[b * K + q];
          for (index r = first; r < last; ++r) {
            const T v = engine.v(b, q, r % n);
            const index at = (r - first) * m;
            for (index j = 0; j < m; ++j) weighted[at + j] = v * sh[at + j];
          }
          T* __restrict e = trace + ((q * B + b) * rows + first) * m;
          for (index i = 0; i < entries; ++i) {
            update[i] += error * e[i];
            e[i] = e[i] * decay + weighted[i];
          }
        }
      },
      [&](index p, index first, index last, const T* update, T divisor) {
        optimizer->apply(weight, (p * rows + first) * m, update, divisor, (last - first) * m);
      });
  engine.finish();
  return 0;
}

}  // namespace

extern "C" {
int td_elstm_float32(const TDArgs* td, const ElementwiseArgs* cells) { return td_elstm<float>(*td, *cells); }
int td_elstm_float64(const TDArgs* td, const ElementwiseArgs* cells) { return td_elstm<double>(*td, *cells); }
int td_uoro_float32(const TDArgs* td, const TangentArgs* uoro) { return td_uoro<float>(*td, *uoro); }
int td_uoro_float64(const TDArgs* td, const TangentArgs* uoro) { return td_uoro<double>(*td, *uoro); }
int td_snap1_float32(const TDArgs* td, const SnapArgs* snap) { return td_snap1<float>(*td, *snap); }
int td_snap1_float64(const TDArgs* td, const SnapArgs* snap) { return td_snap1<double>(*td, *snap); }
}
