// The fused TD step of UORO (plugins/uoro.py): a dense LSTM with the unbiased rank-one
// tangents; the step's random signs are drawn by the learner (begin_step) before the call.

#include "dense.h"

namespace {

// ------------------------------------------------------------------ UORO
// plugins/uoro.py on the dense LSTM of plugins/dense_lstm.py.
template <typename T>
int td_uoro(const TDArgs& td, const TangentArgs& uoro) {
  Engine<T> engine(td);
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
  T* trace = engine.learner_trace();  // [K, B, 4, n, m]
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
          const T error = engine.delta[b * K + q], decay = engine.decay(b, q);
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

}  // namespace

extern "C" {
int td_uoro_float32(const TDArgs* td, const TangentArgs* args) { return td_uoro<float>(*td, *args); }
int td_uoro_float64(const TDArgs* td, const TangentArgs* args) { return td_uoro<double>(*td, *args); }
}
