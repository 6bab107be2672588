// The fused TD step of eLSTM (plugins/elstm.py): Irie et al.'s element-wise LSTM with exact
// RTRL; each of its five parameters has its own traces and optimiser state.

#include "dense.h"
#include <agentstate/actor_critic.h>

namespace {

// ------------------------------------------------------------------ eLSTM
// plugins/elstm.py. Parameters in ElementwiseCells order.
enum ElementwiseParameter : index {
  GATE_INPUT_WEIGHT = 0, GATE_CELL_WEIGHT, GATE_BIAS, OUTPUT_WEIGHT, OUTPUT_BIAS, N_PARAMETERS
};

// One step of every stream through `engine` (the TD engine, or actor_critic.h's).
template <typename T, typename E>
int elstm_step(E& engine, const ElementwiseArgs& cells) {
  const TDArgs& td = engine.td;
  const index B = engine.B, P = engine.P, D = engine.d, N = engine.n, K = engine.K;
  const index rows = 2 * N;        // gate rows (g, n): z then f
  const index width = D + 2;       // a sensitivity row: [W_g[n], w_g[n], b_g[n]]
  const index output_width = D + N;  // W_o acts on [x; c]
  auto** parameters = reinterpret_cast<T**>(cells.parameters);
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
    for (index k = 0; k < N_PARAMETERS; ++k) optimizers[k].emplace(engine.learner_optimizer(k));
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
    T* output_trace = engine.learner_trace(OUTPUT_WEIGHT);     // [K, B, N, D + N]
    T* output_bias_trace = engine.learner_trace(OUTPUT_BIAS);  // [K, B, N]
    sweep_rows(
        engine, N, output_width + 1, B * N * output_width * (K + 1), true,
        [&](index b, index first, index last, T* update, T* scratch) {
          const index count = last - first, entries = count * output_width;
          const T* __restrict z = output_input.data() + b * output_width;
          for (index q = 0; q < K; ++q) {
            const T error = engine.delta[b * K + q], decay = engine.decay(b, q);
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
  T* input_trace = engine.learner_trace(GATE_INPUT_WEIGHT);  // [K, B, 2, N, D]
  T* cell_trace = engine.learner_trace(GATE_CELL_WEIGHT);    // [K, B, 2, N]
  T* bias_trace = engine.learner_trace(GATE_BIAS);           // [K, B, 2, N]
  sweep_rows(
      engine, rows, width, B * rows * width * (train ? K + 1 : 1), train,
      [&](index b, index first, index last, T* update, T* scratch) {
        const index count = last - first;
        const T* __restrict x_b = x + b * D;
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
          const T error = engine.delta[b * K + q], decay = engine.decay(b, q);
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

template <typename T>
int td_elstm(const TDArgs& td, const ElementwiseArgs& cells) {
  Engine<T> engine(td);
  return elstm_step<T>(engine, cells);
}

}  // namespace

AGENTSTATE_ACTOR_CRITIC_ENTRIES(td_elstm, elstm_step, ElementwiseArgs)

extern "C" {
int td_elstm_float32(const TDArgs* td, const ElementwiseArgs* args) { return td_elstm<float>(*td, *args); }
int td_elstm_float64(const TDArgs* td, const ElementwiseArgs* args) { return td_elstm<double>(*td, *args); }
}
