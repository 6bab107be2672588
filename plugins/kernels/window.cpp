// The fused TD step of T-BPTT (plugins/tbptt.py): a dense LSTM whose gradient is
// back-propagated through a window of the last k steps.

#include "dense.h"

namespace {

// One stream's trace e [rows, m] += its window's gradient, row by row:
// e[r] = decay e[r] + sum_age adjoint(age, r) z_age, with adjoint(age, r) = adjoints[age *
// stride + r * lane] and the sum over ages (newest first) held in registers: `AGES` is a
// compile-time count so the loop along the row vectorises.
template <index AGES, typename T>
void add_window_gradient_unrolled(T* __restrict e, T decay, const T* adjoints, index stride,
                                  index lane, const T* const* inputs, index rows, index m) {
  for (index r = 0; r < rows; ++r) {
    T s[AGES];
    for (index age = 0; age < AGES; ++age) s[age] = adjoints[age * stride + r * lane];
    T* __restrict e_row = e + r * m;
#pragma omp simd
    for (index i = 0; i < m; ++i) {
      T gradient = s[0] * inputs[0][i];
      for (index age = 1; age < AGES; ++age) gradient += s[age] * inputs[age][i];
      e_row[i] = e_row[i] * decay + gradient;
    }
  }
}

// The same for any number of ages (`gradient`: scratch of m entries, for more than 8).
template <typename T>
void add_window_gradient(T* __restrict e, T decay, const T* adjoints, index stride, index lane,
                         const T* const* inputs, index ages, index rows, index m,
                         T* __restrict gradient) {
  switch (ages) {
#define AGENTSTATE_AGES(N)                                                              \
  case N:                                                                               \
    return add_window_gradient_unrolled<N>(e, decay, adjoints, stride, lane, inputs, rows, m);
    AGENTSTATE_AGES(1)
    AGENTSTATE_AGES(2)
    AGENTSTATE_AGES(3)
    AGENTSTATE_AGES(4)
    AGENTSTATE_AGES(5)
    AGENTSTATE_AGES(6)
    AGENTSTATE_AGES(7)
    AGENTSTATE_AGES(8)
#undef AGENTSTATE_AGES
    default:
      break;
  }
  for (index r = 0; r < rows; ++r) {
    T* __restrict e_row = e + r * m;
    const T* scale = adjoints + r * lane;
    for (index i = 0; i < m; ++i) gradient[i] = scale[0] * inputs[0][i];
    for (index age = 1; age < ages; ++age) {
      const T s = scale[age * stride];
      const T* __restrict z = inputs[age];
      for (index i = 0; i < m; ++i) gradient[i] += s * z[i];
    }
    for (index i = 0; i < m; ++i) e_row[i] = e_row[i] * decay + gradient[i];
  }
}

// With shared weights and at least one vector of streams, T-BPTT's forward pass and its
// adjoints run across the streams (the inner loop walks the streams, not rows of n or
// d + n + 1 entries, which are too short to vectorise well at small n; each weight is read
// once per group, which pays at large n), threads taking whole vectors of streams, in
// groups of at most WINDOW_STREAM_GROUP streams so that the scratch stays k x 4n x 32.
constexpr index WINDOW_STREAM_GROUP = 32;

// plugins/tbptt.py: a window of the last k steps, newest in slot 0; grad(v) back-propagates
// v through it with the current (updated) recurrent weights U = W[:, :, :, d : d + n].
template <typename T>
int td_window(const TDArgs& td, const WindowArgs& win) {
  Engine<T> engine(td);
  const index B = engine.B, P = engine.P, d = engine.d, n = engine.n, K = engine.K;
  const index window = win.truncation, m = d + n + 1, rows = N_GATES * n, block = rows * m;
  auto* weight = static_cast<T*>(win.weight);                    // [P, 4, n, m]
  auto* h_carry = static_cast<T*>(win.h);                        // [B, n]
  auto* c_carry = static_cast<T*>(win.c);                        // [B, n]
  auto* cell_input = static_cast<T*>(win.window_cell_input);     // [k, B, m]
  auto* dc_da = static_cast<T*>(win.window_dc_dpreactivation);   // [k, B, 4, n]
  auto* dh_da = static_cast<T*>(win.window_dh_dpreactivation);   // [k, B, 4, n]
  auto* forget = static_cast<T*>(win.window_dc_dc_prev);         // [k, B, n]
  auto* dh_dc = static_cast<T*>(win.window_dh_dc);               // [k, B, n]
  auto* steps_in_window = static_cast<int64_t*>(win.steps_in_window);  // [B]

  engine.normalize_observation();

  // Age every window slot by one step; slot 0 receives this step.
  T* slots[5] = {cell_input, dc_da, dh_da, forget, dh_dc};
  const index slot_sizes[5] = {B * m, B * rows, B * rows, B * n, B * n};
  for (int s = 0; s < 5; ++s) {
    std::memmove(slots[s] + slot_sizes[s], slots[s], sizeof(T) * slot_sizes[s] * (window - 1));
  }
  constexpr index LANES = Vector<T>::lanes;
  const bool across_streams = P == 1 && B >= LANES;
  // body(first, last) on `threads` threads over groups of at most WINDOW_STREAM_GROUP streams,
  // each thread's share a whole number of vectors of streams.
  auto across_groups = [&](index threads, const auto& body) {
    parallel_for((B + LANES - 1) / LANES, threads, [&](index first_vector, index last_vector) {
      const index last_stream = std::min(B, last_vector * LANES);
      for (index group = first_vector * LANES; group < last_stream; group += WINDOW_STREAM_GROUP) {
        body(group, std::min(last_stream, group + WINDOW_STREAM_GROUP));
      }
    });
  };
  // This step's cell input z = [x^, h_prev, 1] goes to window slot 0, read in full before h
  // moves; the gates' derivatives go to the other slots.
  auto cell_input_of = [&](index b) {
    T* z = cell_input + b * m;
    std::copy_n(engine.observation.data() + b * d, d, z);
    std::copy_n(h_carry + b * n, n, z + d);
    z[d + n] = T(1);
    return z;
  };
  // Unit i of stream b: its gates' outputs and derivatives stored in place.
  auto store_gates = [&](index b, index i, const LstmGates<T>& gates) {
    T* __restrict dc_da_b = dc_da + b * rows;
    T* __restrict dh_da_b = dh_da + b * rows;
    dc_da_b[GATE_I * n + i] = gates.kappa_i;
    dc_da_b[GATE_F * n + i] = gates.kappa_f;
    dc_da_b[GATE_G * n + i] = gates.kappa_g;
    dc_da_b[GATE_O * n + i] = T(0);
    dh_da_b[GATE_I * n + i] = gates.mu * gates.kappa_i;
    dh_da_b[GATE_F * n + i] = gates.mu * gates.kappa_f;
    dh_da_b[GATE_G * n + i] = gates.mu * gates.kappa_g;
    dh_da_b[GATE_O * n + i] = gates.dh_do;
    forget[b * n + i] = gates.forget;
    dh_dc[b * n + i] = gates.mu;
    c_carry[b * n + i] = gates.c;
    h_carry[b * n + i] = gates.h;
  };
  auto forward_streams = [&](index first_stream, index last_stream) {
    std::vector<T> a(rows);
    for (index b = first_stream; b < last_stream; ++b) {
      const T* z = cell_input_of(b);
      const T* w = weight + (P == 1 ? 0 : b) * block;
      for (index r = 0; r < rows; ++r) a[r] = dot(w + r * m, z, m);
      const T* __restrict a_b = a.data();
#pragma omp simd
      for (index i = 0; i < n; ++i) {
        store_gates(b, i, lstm_gates(a_b[GATE_I * n + i], a_b[GATE_F * n + i],
                                     a_b[GATE_G * n + i], a_b[GATE_O * n + i], c_carry[b * n + i]));
      }
      steps_in_window[b] = std::min<int64_t>(steps_in_window[b] + 1, window);
    }
  };
  // The same with the streams innermost: a [d + n + 1, w] copy of the cell inputs, each
  // weight multiplied into all w streams' pre-activations, the gates vectorised over streams
  // in whole blocks of GATE_LANES (a stream's exp and tanh must not depend on whether it
  // fell in a vector or in a scalar remainder: vector and scalar libm differ in the last bits).
  auto forward_across = [&](index first_stream, index last_stream) {
    const index w = last_stream - first_stream;
    const index padded = (w + GATE_LANES - 1) / GATE_LANES * GATE_LANES;
    std::vector<T> z_by_entry(m * padded, T(0)), a(rows * padded), c_prev(n * padded, T(0));
    for (index b = first_stream; b < last_stream; ++b) {
      const T* z = cell_input_of(b);
      for (index i = 0; i < m; ++i) z_by_entry[i * padded + b - first_stream] = z[i];
      for (index i = 0; i < n; ++i) c_prev[i * padded + b - first_stream] = c_carry[b * n + i];
    }
    // a[r, s] = W[r] . z_s: the rows of W weigh the rows of z_by_entry.
    combine_columns(a.data(), padded, weight, m, index(1), z_by_entry.data(), m, padded, rows);
    LstmGates<T> gates[GATE_LANES];
    for (index i = 0; i < n; ++i) {
      for (index block_start = 0; block_start < w; block_start += GATE_LANES) {
        const index offset = block_start;
        const T* __restrict a_i = a.data() + (GATE_I * n + i) * padded + offset;
        const T* __restrict a_f = a.data() + (GATE_F * n + i) * padded + offset;
        const T* __restrict a_g = a.data() + (GATE_G * n + i) * padded + offset;
        const T* __restrict a_o = a.data() + (GATE_O * n + i) * padded + offset;
        const T* __restrict c_i = c_prev.data() + i * padded + offset;
#pragma omp simd
        for (index l = 0; l < GATE_LANES; ++l) gates[l] = lstm_gates(a_i[l], a_f[l], a_g[l], a_o[l], c_i[l]);
        for (index l = 0; l < std::min(GATE_LANES, w - block_start); ++l) {
          store_gates(first_stream + block_start + l, i, gates[l]);
        }
      }
    }
    for (index b = first_stream; b < last_stream; ++b) {
      steps_in_window[b] = std::min<int64_t>(steps_in_window[b] + 1, window);
    }
  };
  if (across_streams) {
    across_groups(threads_for(td, B * block, B), forward_across);
  } else {
    parallel_for(B, threads_for(td, B * block, B), forward_streams);
  }

  engine.predict(h_carry);
  engine.update_heads();
  engine.learner_state_weight();
  if (!td.train_learner) {
    engine.finish();
    return 0;
  }

  // Pass 1: the optimiser's update from the old traces (eager forms grad after the update).
  ParameterOptimizer<T> optimizer = engine.learner_optimizer();
  T* trace = engine.learner_trace();  // [K, B, 4, n, m]
  const index window_work = B * block * (K + window);  // traces, and the window's outer products
  if (P == 1) {  // each thread sums over the streams for its own weight rows
    parallel_for(rows, threads_for(td, window_work, rows), [&](index first_row, index last_row) {
      const index begin = first_row * m, count = (last_row - first_row) * m;
      std::vector<T> update(count, T(0));
      for (index b = 0; b < B; ++b) {
        for (index q = 0; q < K; ++q) {
          const T error = engine.delta[b * K + q];
          const T* __restrict e = trace + (q * B + b) * block + begin;
          T* __restrict u = update.data();
          for (index i = 0; i < count; ++i) u[i] += error * e[i];
        }
      }
      optimizer.apply(weight, begin, update.data(), T(B), count);
    });
  } else {
    parallel_for(B, threads_for(td, window_work, B), [&](index first_stream, index last_stream) {
      std::vector<T> update(block);
      for (index b = first_stream; b < last_stream; ++b) {
        std::fill(update.begin(), update.end(), T(0));
        for (index q = 0; q < K; ++q) {
          const T error = engine.delta[b * K + q];
          const T* __restrict e = trace + (q * B + b) * block;
          T* __restrict u = update.data();
          for (index i = 0; i < block; ++i) u[i] += error * e[i];
        }
        optimizer.apply(weight, b * block, update.data(), T(1), block);
      }
    });
  }

  // Pass 2: adjoints of the pre-activations at every age of the window, newest first,
  // then trace = gamma lambda trace + sum_age adjoint_age (x) z_age.
  // The trace of stream b from its adjoints: adjoint(age, r) = adjoints[age * stride + r * lane].
  auto add_gradient = [&](index b, index q, const T* adjoints, index stride, index lane,
                          std::vector<const T*>& inputs, std::vector<T>& gradient) {
    const index ages = steps_in_window[b];  // a reset or a young stream ends the window early
    for (index age = 0; age < ages; ++age) inputs[age] = cell_input + (age * B + b) * m;
    add_window_gradient(trace + (q * B + b) * block, engine.decay(b, q), adjoints, stride, lane, inputs.data(),
                        ages, rows, m, gradient.data());
  };
  auto backward_streams = [&](index first_stream, index last_stream) {
    std::vector<T> adjoint(window * rows), adjoint_h(n), adjoint_c(n), next_h(n), next_c(n);
    std::vector<T> gradient(m);
    std::vector<const T*> inputs(window);
    for (index b = first_stream; b < last_stream; ++b) {
      const index ages = steps_in_window[b];
      for (index q = 0; q < K; ++q) {
        for (index i = 0; i < n; ++i) {
          adjoint_h[i] = engine.v(b, q, i);
          adjoint_c[i] = 0;
        }
        for (index age = 0; age < ages; ++age) {
          const index slot = age * B + b;
          T* adjoint_a = adjoint.data() + age * rows;
          for (index k = 0; k < N_GATES; ++k) {
            const T* __restrict dh = dh_da + slot * rows + k * n;
            const T* __restrict dc = dc_da + slot * rows + k * n;
            T* __restrict adjoint_k = adjoint_a + k * n;
            for (index i = 0; i < n; ++i) adjoint_k[i] = adjoint_h[i] * dh[i] + adjoint_c[i] * dc[i];
          }
          if (age + 1 == ages) break;  // the oldest age's adjoints feed nothing further back
          // next_h = U^T adjoint_a, summed over rows in order. The first row initialises the
          // sum (no separate zero fill: a narrow store followed by a wide load of the same
          // bytes stalls the pipeline, which dominated small networks).
          const T* __restrict recurrent = weight + (P == 1 ? 0 : b) * block + d;
          T* __restrict h_sum = next_h.data();
          for (index j = 0; j < n; ++j) h_sum[j] = adjoint_a[0] * recurrent[j];
          for (index r = 1; r < rows; ++r) {
            const T* __restrict u = recurrent + r * m;
            const T scale = adjoint_a[r];
            for (index j = 0; j < n; ++j) h_sum[j] += scale * u[j];
          }
          for (index i = 0; i < n; ++i) {
            const T f = forget[slot * n + i];
            next_c[i] = dh_dc[slot * n + i] * f * adjoint_h[i] + f * adjoint_c[i];
          }
          std::swap(adjoint_h, next_h);
          std::swap(adjoint_c, next_c);
        }
        add_gradient(b, q, adjoint.data(), rows, 1, inputs, gradient);
      }
    }
  };
  // The same with the streams innermost (shared weights): adjoints are [age, 4n, w] and
  // U^T adjoint is one multiply-add per recurrent weight across all w streams. Streams whose
  // window is shorter than the longest carry zero adjoints at the ages they lack.
  auto backward_across = [&](index first_stream, index last_stream) {
    const index w = last_stream - first_stream;
    std::vector<T> adjoint(window * rows * w), adjoint_h(n * w), adjoint_c(n * w);
    std::vector<T> next_h(n * w), next_c(n * w), gradient(m);
    std::vector<const T*> inputs(window);
    const int64_t* ages = steps_in_window + first_stream;
    const index oldest = *std::max_element(ages, ages + w);
    const T* __restrict recurrent = weight + d;  // U[r, j] = recurrent[r * m + j]
    for (index q = 0; q < K; ++q) {
      for (index i = 0; i < n; ++i) {
        std::fill_n(adjoint_h.data() + i * w, w, engine.v(0, q, i));
        std::fill_n(adjoint_c.data() + i * w, w, T(0));
      }
      for (index age = 0; age < oldest; ++age) {
        const T* __restrict dh = dh_da + (age * B + first_stream) * rows;
        const T* __restrict dc = dc_da + (age * B + first_stream) * rows;
        T* __restrict adjoint_a = adjoint.data() + age * rows * w;
        for (index r = 0; r < rows; ++r) {
          const T* __restrict a_h = adjoint_h.data() + (r % n) * w;
          const T* __restrict a_c = adjoint_c.data() + (r % n) * w;
          T* __restrict adjoint_r = adjoint_a + r * w;
#pragma omp simd
          for (index s = 0; s < w; ++s) {
            const T value = a_h[s] * dh[s * rows + r] + a_c[s] * dc[s * rows + r];
            adjoint_r[s] = age < ages[s] ? value : T(0);
          }
        }
        if (age + 1 == oldest) break;
        // next_h[j, s] = sum_r U[r, j] adjoint_a[r, s]
        combine_columns(next_h.data(), w, recurrent, index(1), m, adjoint_a, rows, w, n);
        const T* __restrict f = forget + (age * B + first_stream) * n;
        const T* __restrict mu = dh_dc + (age * B + first_stream) * n;
        for (index i = 0; i < n; ++i) {
          const T* __restrict a_h = adjoint_h.data() + i * w;
          const T* __restrict a_c = adjoint_c.data() + i * w;
          T* __restrict c_sum = next_c.data() + i * w;
#pragma omp simd
          for (index s = 0; s < w; ++s) {
            const T f_i = f[s * n + i];
            c_sum[s] = mu[s * n + i] * f_i * a_h[s] + f_i * a_c[s];
          }
        }
        std::swap(adjoint_h, next_h);
        std::swap(adjoint_c, next_c);
      }
      for (index s = 0; s < w; ++s) {
        add_gradient(first_stream + s, q, adjoint.data() + s, rows * w, w, inputs, gradient);
      }
    }
  };
  if (across_streams) {
    across_groups(threads_for(td, window_work, B), backward_across);
  } else {
    parallel_for(B, threads_for(td, window_work, B), backward_streams);
  }
  engine.finish();
  return 0;
}

}  // namespace

extern "C" {
int td_window_float32(const TDArgs* td, const WindowArgs* args) { return td_window<float>(*td, *args); }
int td_window_float64(const TDArgs* td, const WindowArgs* args) { return td_window<double>(*td, *args); }
}
