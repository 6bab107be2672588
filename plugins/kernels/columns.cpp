// The fused TD step of columnar and CCN learners (plugins/columnar.py, plugins/ccn.py):
// scalar-state LSTM columns with exact RTRL, built in stages. The learner's part is fused
// into one sweep over its sensitivities, so that every large array (sensitivities, traces,
// weights, optimiser state) is read and written once per step.

#include <agentstate/actor_critic.h>

namespace {

// ------------------------------------------------------------------ columns (columnar, CCN)
// Ask for the entries `PREFETCH_BYTES` past this block of each array: with short rows the
// hardware prefetcher alone falls behind once the arrays live in main memory, and with long
// ones a longer look-ahead pays (benchmarks/README.md has the measurements).
constexpr index PREFETCH_BYTES = 16384;

template <typename T>
inline void prefetch_ahead(const T* a, const T* b, const T* c, index block) {
  const index lines = (block * index(sizeof(T)) + 63) / 64;
  const index ahead = PREFETCH_BYTES / index(sizeof(T));
  for (index line = 0; line < lines; ++line) {
    const index at = ahead + line * 64 / index(sizeof(T));
    __builtin_prefetch(a + at, 1);
    __builtin_prefetch(b + at, 1);
    if (c) __builtin_prefetch(c + at, 1);
  }
}


// Per (stream, active column): the scalars of the exact RTRL step (plugins/columnar.py).
template <typename T>
struct ColumnStep {
  T forget;                    // f
  T dc_dh_prev;                // sum_k kappa_k u_k
  T kappa[N_GATES];            // dc/da
  T dh_dh_prev_output;         // dh/da_o * u_o
  T dh_dc;                     // o (1 - tanh(c)^2)
  T dh_doutput_preactivation;  // tanh(c) o (1 - o)
  T h_prev;
};

// One step of every stream through `engine` (the TD engine, or actor_critic.h's).
template <typename T, typename E>
int columns_step(E& engine, const ColumnArgs& col) {
  const TDArgs& td = engine.td;
  const index B = engine.B, P = engine.P, d = engine.d, n = engine.n, K = engine.K;
  const index L = col.columns_per_stage, active = col.active_stage;
  const index m = d + active * L + 2;  // the active stage's column input size
  auto* h_carry = static_cast<T*>(col.h);
  auto* c_carry = static_cast<T*>(col.c);
  auto** weights = reinterpret_cast<T**>(col.stage_weights);
  auto** means = reinterpret_cast<T**>(col.stage_means);
  auto** variances = reinterpret_cast<T**>(col.stage_variances);
  auto** input_means = reinterpret_cast<T**>(col.stage_input_means);
  auto** input_variances = reinterpret_cast<T**>(col.stage_input_variances);
  const auto* raw_x = static_cast<const T*>(td.x);

  engine.normalize_observation();

  // Forward pass of every built column, stage by stage, with the weights before this step's
  // update. A column's weights are read once for all streams.
  std::vector<T> h(B * n, T(0)), c(B * n, T(0));
  std::vector<T> stage_input;  // [B, d + sL]: x^ and the earlier columns' (normalised) states
  std::vector<T> stage_input_by_entry;  // the same, transposed to [d + sL, B] (shared weights)
  std::vector<T> feature_std;           // [P, sL]
  std::vector<T> input_std;             // [P, d]: the stage's own input statistics
  std::vector<ColumnStep<T>> steps(B * L);
  for (index s = 0; s <= active; ++s) {
    const index width = d + s * L, row_size = width + 2;
    stage_input.resize(B * width);
    feature_std.resize(P * s * L);
    if (col.normalize_features) {
      for (index e = 0; e < P * s * L; ++e) feature_std[e] = std::sqrt(variances[s][e]);
    }
    if (col.normalize_inputs) {
      input_std.resize(P * d);
      for (index e = 0; e < P * d; ++e) input_std[e] = std::sqrt(input_variances[s][e]);
    }
    for (index b = 0; b < B; ++b) {
      const index p = P == 1 ? 0 : b;
      T* input = stage_input.data() + b * width;
      if (col.normalize_inputs) {
        for (index i = 0; i < d; ++i) {
          input[i] = (raw_x[b * d + i] - input_means[s][p * d + i]) / input_std[p * d + i];
        }
      } else {
        std::copy_n(engine.observation.data() + b * d, d, input);
      }
      for (index e = 0; e < s * L; ++e) {
        const T h_prev = h_carry[b * n + e];
        input[d + e] = col.normalize_features
            ? (h_prev - means[s][p * s * L + e]) / feature_std[p * s * L + e]
            : h_prev;
      }
    }
    // Shared weights and short rows: pre-activations of all streams at once, one multiply-add
    // per weight and input across the streams. Long rows vectorise along the row instead.
    const bool across_streams = P == 1 && width <= ACROSS_STREAMS_MAX_WIDTH;
    if (across_streams) {
      stage_input_by_entry.resize(width * B);
      for (index b = 0; b < B; ++b)
        for (index i = 0; i < width; ++i) stage_input_by_entry[i * B + b] = stage_input[b * width + i];
    }
    // Per column: the pre-activations of every stream ([4, B]), then the gates of every
    // stream in one vectorised loop.
    auto forward_columns = [&](index first_column, index last_column) {
      std::vector<T> a(N_GATES * B), h_prev(B), c_prev(B), gates(6 * B);
      T* i_gate = gates.data();
      T* f_gate = i_gate + B;
      T* candidate = f_gate + B;
      T* o_gate = candidate + B;
      T* c_new = o_gate + B;
      T* tanh_c = c_new + B;
      for (index j = first_column; j < last_column; ++j) {
        const index column = s * L + j;
        for (index b = 0; b < B; ++b) {
          h_prev[b] = h_carry[b * n + column];
          c_prev[b] = c_carry[b * n + column];
        }
        if (across_streams) {
          const T* w = weights[s] + j * N_GATES * row_size;
          for (index k = 0; k < N_GATES; ++k) {
            const T* row = w + k * row_size;
            T* __restrict a_k = a.data() + k * B;
            std::fill_n(a_k, B, T(0));
            for (index i = 0; i < width; ++i) {
              const T weight_i = row[i];
              const T* __restrict x_i = stage_input_by_entry.data() + i * B;
              for (index b = 0; b < B; ++b) a_k[b] += x_i[b] * weight_i;
            }
            for (index b = 0; b < B; ++b) a_k[b] = a_k[b] + row[width] * h_prev[b] + row[width + 1];
          }
        } else {
          for (index b = 0; b < B; ++b) {
            const T* w = weights[s] + ((P == 1 ? 0 : b) * L + j) * N_GATES * row_size;
            for (index k = 0; k < N_GATES; ++k) {
              const T* row = w + k * row_size;
              a[k * B + b] = dot(row, stage_input.data() + b * width, width) +
                             row[width] * h_prev[b] + row[width + 1];
            }
          }
        }
        const T* __restrict a_i = a.data() + GATE_I * B;
        const T* __restrict a_f = a.data() + GATE_F * B;
        const T* __restrict a_g = a.data() + GATE_G * B;
        const T* __restrict a_o = a.data() + GATE_O * B;
#pragma omp simd
        for (index b = 0; b < B; ++b) {
          i_gate[b] = sigmoid(a_i[b]);
          f_gate[b] = sigmoid(a_f[b]);
          candidate[b] = vector_tanh(a_g[b]);
          o_gate[b] = sigmoid(a_o[b]);
          c_new[b] = f_gate[b] * c_prev[b] + i_gate[b] * candidate[b];
          tanh_c[b] = vector_tanh(c_new[b]);
        }
        for (index b = 0; b < B; ++b) {
          h[b * n + column] = o_gate[b] * tanh_c[b];
          c[b * n + column] = c_new[b];
        }
        if (s != active) continue;
        for (index b = 0; b < B; ++b) {
          const T* w = weights[s] + ((P == 1 ? 0 : b) * L + j) * N_GATES * row_size;
          ColumnStep<T>& step = steps[b * L + j];
          step.forget = f_gate[b];
          step.kappa[GATE_I] = candidate[b] * i_gate[b] * (T(1) - i_gate[b]);
          step.kappa[GATE_F] = c_prev[b] * f_gate[b] * (T(1) - f_gate[b]);
          step.kappa[GATE_G] = i_gate[b] * (T(1) - candidate[b] * candidate[b]);
          step.kappa[GATE_O] = 0;
          T dc_dh_prev = 0;
          for (index k = 0; k < N_GATES; ++k) dc_dh_prev += step.kappa[k] * w[k * row_size + width];
          step.dc_dh_prev = dc_dh_prev;
          step.dh_doutput_preactivation = tanh_c[b] * o_gate[b] * (T(1) - o_gate[b]);
          step.dh_dh_prev_output = step.dh_doutput_preactivation * w[GATE_O * row_size + width];
          step.dh_dc = o_gate[b] * (T(1) - tanh_c[b] * tanh_c[b]);
          step.h_prev = h_prev[b];
        }
      }
    };
    parallel_for(L, threads_for(td, B * L * N_GATES * row_size, L), forward_columns);
  }
  // The active stage's statistics move after its step read them (plugins/ccn.py).
  if (col.normalize_inputs) {
    update_statistics(raw_x, d, B, P, d, col.normalization_rate, col.variance_floor,
                      input_means[active], input_variances[active]);
  }
  if (col.normalize_features && active > 0) {
    update_statistics(h_carry, n, B, P, active * L, col.normalization_rate, col.variance_floor,
                      means[active], variances[active]);
  }

  engine.predict(h.data());
  engine.update_heads();
  engine.learner_state_weight();

  // The sweep: per active column, per stream, the column's [4, m] block of sensitivities,
  // then the optimiser's update from the old traces, then the new traces. Rows i, f, g are
  // one loop of 3m entries (kappa_k z_i, with z repeated per row), row o (kappa_o = 0) adds
  // dh/da_o z: loops long enough to vectorise even when m is short. Columns go in chunks of
  // ~64 KB of weights: each stream's chunk is one contiguous run of every array (prefetch
  // friendly), while a shared-parameter chunk's update sum stays in cache across streams.
  const bool train = td.train_learner;
  std::optional<ParameterOptimizer<T>> optimizer;
  if (train) optimizer.emplace(engine.learner_optimizer());
  T* weight = weights[active];
  auto* sensitivity_h = static_cast<T*>(col.sensitivity_h);
  auto* sensitivity_c = static_cast<T*>(col.sensitivity_c);
  T* trace = engine.learner_trace();
  const index block = N_GATES * m;  // one column's weights
  const index rows_ifg = 3 * m;
  const index sweep_threads = threads_for(td, B * L * block * (train ? K + 1 : 1), L);
  const index chunk = std::max<index>(
      1, std::min({L, (index(1) << 14) / block, (L + sweep_threads - 1) / sweep_threads}));
  const index chunks = (L + chunk - 1) / chunk;
  // Each thread sweeps its own run of chunks with its own scratch.
  auto sweep_chunks = [&](index first_chunk, index last_chunk) {
    std::vector<T> update(chunk * block), repeated_input(B * rows_ifg), kappa(rows_ifg);
    for (index b = 0; b < B; ++b) {  // z = [x^, n_k(h_<k), h_j (patched per column), 1]
      for (index k = 0; k < 3; ++k) {
        T* z = repeated_input.data() + b * rows_ifg + k * m;
        std::copy_n(stage_input.data() + b * (m - 2), m - 2, z);
        z[m - 1] = T(1);
      }
    }
    for (index first = first_chunk * chunk; first < std::min(L, last_chunk * chunk);
         first += chunk) {
      const index last = std::min(L, first + chunk);
      if (P == 1) std::fill(update.begin(), update.end(), T(0));
      for (index b = 0; b < B; ++b) {
        for (index j = first; j < last; ++j) {
          const ColumnStep<T> step = steps[b * L + j];
          T* __restrict z = repeated_input.data() + b * rows_ifg;
          for (index k = 0; k < 3; ++k) {
            z[k * m + m - 2] = step.h_prev;
            std::fill_n(kappa.data() + k * m, m, step.kappa[k]);
          }
          const index offset = (b * L + j) * block;
          T* __restrict sh = sensitivity_h + offset;
          T* __restrict sc = sensitivity_c + offset;
          prefetch_ahead(sh, sc, train ? trace + offset : nullptr, block);
          const T* __restrict kappa_row = kappa.data();
          const T forget = step.forget, dc_dh_prev = step.dc_dh_prev;
          const T dh_dh_prev = step.dh_dh_prev_output, dh_dc = step.dh_dc;
          for (index i = 0; i < rows_ifg; ++i) {
            T sc_new = forget * sc[i] + dc_dh_prev * sh[i] + kappa_row[i] * z[i];
            sh[i] = dh_dh_prev * sh[i] + dh_dc * sc_new;
            sc[i] = sc_new;
          }
          const T dh_da = step.dh_doutput_preactivation;
          const T* __restrict z_o = z + 2 * m;
          T* __restrict sh_o = sh + rows_ifg;
          T* __restrict sc_o = sc + rows_ifg;
          for (index i = 0; i < m; ++i) {
            T sc_new = forget * sc_o[i] + dc_dh_prev * sh_o[i];
            sh_o[i] = dh_dh_prev * sh_o[i] + dh_dc * sc_new + dh_da * z_o[i];
            sc_o[i] = sc_new;
          }
          if (!train) continue;
          T* __restrict u = update.data() + (P == 1 ? (j - first) * block : 0);
          if (P != 1) std::fill_n(u, block, T(0));
          for (index q = 0; q < K; ++q) {
            const T error = engine.delta[b * K + q], decay = engine.decay(b, q);
            const T v = engine.v(b, q, active * L + j);
            T* __restrict e = trace + q * B * L * block + offset;
            for (index i = 0; i < block; ++i) {
              u[i] += error * e[i];
              e[i] = e[i] * decay + v * sh[i];
            }
          }
          if (P != 1) optimizer->apply(weight, offset, u, T(1), block);
        }
      }
      if (train && P == 1) {
        optimizer->apply(weight, first * block, update.data(), T(B), (last - first) * block);
      }
    }
  };
  parallel_for(chunks, sweep_threads, sweep_chunks);

  std::copy(h.begin(), h.end(), h_carry);
  std::copy(c.begin(), c.end(), c_carry);
  engine.finish();
  return 0;
}

template <typename T>
int td_columns(const TDArgs& td, const ColumnArgs& col) {
  Engine<T> engine(td);
  return columns_step<T>(engine, col);
}

}  // namespace

AGENTSTATE_ACTOR_CRITIC_ENTRIES(td_columns, columns_step, ColumnArgs)

extern "C" {
int td_columns_float32(const TDArgs* td, const ColumnArgs* args) { return td_columns<float>(*td, *args); }
int td_columns_float64(const TDArgs* td, const ColumnArgs* args) { return td_columns<double>(*td, *args); }
}
