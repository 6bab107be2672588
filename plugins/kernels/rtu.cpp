// The fused TD step of recurrent trace units (plugins/rtu.py): Elelimy et al.'s linear RTU,
// a complex diagonal linear recurrence with an output nonlinearity, and its exact RTRL; the
// shared engine (<agentstate/engine.h>) does the normalisation, heads, TD error, optimisers
// and traces. Per stream and unit k (module docstring of plugins/rtu.py), with
// lambda = g + i phi = r e^(i theta), gamma = sqrt(1 - r^2), u = W_1[k] . x^ + i W_2[k] . x^:
//
//   c = lambda c + gamma u;   h = [f(Re c); f(Im c)]
//   [E, S^nu, S^theta] = lambda [E, S^nu, S^theta]
//                        + [gamma x^, nu (r^2 / gamma u - lambda c_t-1), i theta lambda c_t-1]
//
// then, after the engine's heads and TD error, per parameter: step with delta * (old trace),
// and trace = gamma lambda trace + grad, grad from e = v (.) f'(c) and the sensitivities.
// Element-wise operations follow the eager ops' order, so that each rounds the same way.

#include <agentstate/actor_critic.h>

namespace {

// Parameters in RTUCells.parameters() order.
enum RTUParameter : index { NU_LOG = 0, THETA_LOG, INPUT_WEIGHT, N_PARAMETERS };
// RTUConfig.activation, as RTUCells.arguments passes it.
enum Activation : index { RELU = 0, TANH = 1, LINEAR = 2 };

template <typename T>
inline T activate(index activation, T c) {
  if (activation == RELU) return c > T(0) ? c : T(0);
  if (activation == TANH) return std::tanh(c);
  return c;
}

template <typename T>
inline T slope(index activation, T c) {
  if (activation == RELU) return c > T(0) ? T(1) : T(0);
  if (activation == TANH) {
    const T h = std::tanh(c);
    return T(1) - h * h;
  }
  return T(1);
}

// One step of every stream through `engine` (the TD engine, or actor_critic.h's).
template <typename T, typename E>
int rtu_step(E& engine, const RTUArgs& cells) {
  const TDArgs& td = engine.td;
  const index B = engine.B, P = engine.P, D = engine.d, K = engine.K;
  const index N = engine.n / 2;  // units; h and c are [B, 2, N]
  const index width = D + 2;     // a sensitivity row: [E (D), S^nu, S^theta]
  auto** parameters = reinterpret_cast<T**>(cells.parameters);
  T* nu_log = parameters[NU_LOG];              // [P, N]
  T* theta_log = parameters[THETA_LOG];        // [P, N]
  T* input_weight = parameters[INPUT_WEIGHT];  // [P, 2, N, D]
  auto* c_carry = static_cast<T*>(cells.c);                // [B, 2, N]
  auto* sensitivity = static_cast<T*>(cells.sensitivity);  // [B, 2, N, D + 2]
  const index activation = cells.activation;

  engine.normalize_observation();
  const T* x = engine.observation.data();

  // The eigenvalues with the parameters before this step's update: [P, N] each.
  std::vector<T> nu(P * N), theta(P * N), g(P * N), phi(P * N), gamma(P * N), drive_scale(P * N);
  for (index i = 0; i < P * N; ++i) {
    nu[i] = std::exp(nu_log[i]);
    theta[i] = std::exp(theta_log[i]);
    const T r = std::exp(-nu[i]);
    g[i] = r * std::cos(theta[i]);
    phi[i] = r * std::sin(theta[i]);
    gamma[i] = std::sqrt(-std::expm1(T(-2) * nu[i]));
    drive_scale[i] = r * r / gamma[i];
  }

  std::vector<T> h(B * 2 * N);
  for (index b = 0; b < B; ++b) {
    const index p = P == 1 ? 0 : b;
    const T* x_b = x + b * D;
    T* c = c_carry + b * 2 * N;
    for (index k = 0; k < N; ++k) {
      const index at = p * N + k;
      const T* w_real = input_weight + (p * 2 * N + k) * D;
      const T* w_imaginary = w_real + N * D;
      const T drive_real = dot(w_real, x_b, D), drive_imaginary = dot(w_imaginary, x_b, D);
      const T a = c[k], bi = c[N + k];
      const T rotated_real = g[at] * a - phi[at] * bi;  // lambda c_t-1
      const T rotated_imaginary = phi[at] * a + g[at] * bi;
      c[k] = rotated_real + gamma[at] * drive_real;
      c[N + k] = rotated_imaginary + gamma[at] * drive_imaginary;
      h[b * 2 * N + k] = activate(activation, c[k]);
      h[b * 2 * N + N + k] = activate(activation, c[N + k]);

      T* s_real = sensitivity + (b * 2 * N + k) * width;
      T* s_imaginary = s_real + N * width;
      for (index i = 0; i < width; ++i) {  // S = lambda S
        const T previous_real = s_real[i];
        s_real[i] = s_real[i] * g[at] - s_imaginary[i] * phi[at];
        s_imaginary[i] = s_imaginary[i] * g[at] + previous_real * phi[at];
      }
      for (index i = 0; i < D; ++i) s_real[i] = s_real[i] + gamma[at] * x_b[i];
      s_real[D] = s_real[D] + nu[at] * (drive_scale[at] * drive_real - rotated_real);
      s_imaginary[D] =
          s_imaginary[D] + nu[at] * (drive_scale[at] * drive_imaginary - rotated_imaginary);
      s_real[D + 1] = s_real[D + 1] - theta[at] * rotated_imaginary;
      s_imaginary[D + 1] = s_imaginary[D + 1] + theta[at] * rotated_real;
    }
  }

  engine.predict(h.data());
  engine.update_heads();
  engine.learner_state_weight();

  if (td.train_learner) {
    const ParameterOptimizer<T> nu_optimizer = engine.learner_optimizer(NU_LOG);
    const ParameterOptimizer<T> theta_optimizer = engine.learner_optimizer(THETA_LOG);
    const ParameterOptimizer<T> weight_optimizer = engine.learner_optimizer(INPUT_WEIGHT);
    T* nu_trace = engine.learner_trace(NU_LOG);            // [K, B, N]
    T* theta_trace = engine.learner_trace(THETA_LOG);      // [K, B, N]
    T* weight_trace = engine.learner_trace(INPUT_WEIGHT);  // [K, B, 2, N, D]
    const index weights = 2 * N * D;
    std::vector<T> nu_update(N, T(0)), theta_update(N, T(0)), weight_update(weights, T(0));
    std::vector<T> slopes(2 * N);
    for (index b = 0; b < B; ++b) {
      if (P != 1) {
        std::fill(nu_update.begin(), nu_update.end(), T(0));
        std::fill(theta_update.begin(), theta_update.end(), T(0));
        std::fill(weight_update.begin(), weight_update.end(), T(0));
      }
      const T* c = c_carry + b * 2 * N;
      for (index j = 0; j < 2 * N; ++j) slopes[j] = slope(activation, c[j]);
      for (index q = 0; q < K; ++q) {
        const T error = engine.delta[b * K + q], decay = engine.decay(b, q);
        T* e_nu = nu_trace + (q * B + b) * N;
        T* e_theta = theta_trace + (q * B + b) * N;
        T* e_weight = weight_trace + (q * B + b) * weights;
        for (index k = 0; k < N; ++k) {
          // e_a, e_b: v pulled back through f to Re c and Im c.
          const T e_a = engine.v(b, q, k) * slopes[k];
          const T e_b = engine.v(b, q, N + k) * slopes[N + k];
          const T* s_real = sensitivity + (b * 2 * N + k) * width;
          const T* s_imaginary = s_real + N * width;
          nu_update[k] += error * e_nu[k];
          e_nu[k] = e_nu[k] * decay + (e_a * s_real[D] + e_b * s_imaginary[D]);
          theta_update[k] += error * e_theta[k];
          e_theta[k] = e_theta[k] * decay + (e_a * s_real[D + 1] + e_b * s_imaginary[D + 1]);
          T* e_real_row = e_weight + k * D;  // W_1[k]: e_a Re E + e_b Im E
          T* u_real_row = weight_update.data() + k * D;
          T* e_imaginary_row = e_real_row + N * D;  // W_2[k]: e_b Re E - e_a Im E
          T* u_imaginary_row = u_real_row + N * D;
          for (index i = 0; i < D; ++i) {
            u_real_row[i] += error * e_real_row[i];
            e_real_row[i] = e_real_row[i] * decay + (e_a * s_real[i] + e_b * s_imaginary[i]);
            u_imaginary_row[i] += error * e_imaginary_row[i];
            e_imaginary_row[i] =
                e_imaginary_row[i] * decay + (e_b * s_real[i] - e_a * s_imaginary[i]);
          }
        }
      }
      if (P != 1) {
        nu_optimizer.apply(nu_log, b * N, nu_update.data(), T(1), N);
        theta_optimizer.apply(theta_log, b * N, theta_update.data(), T(1), N);
        weight_optimizer.apply(input_weight, b * weights, weight_update.data(), T(1), weights);
      }
    }
    if (P == 1) {
      nu_optimizer.apply(nu_log, 0, nu_update.data(), T(B), N);
      theta_optimizer.apply(theta_log, 0, theta_update.data(), T(B), N);
      weight_optimizer.apply(input_weight, 0, weight_update.data(), T(B), weights);
    }
  }
  engine.finish();
  return 0;
}

template <typename T>
int td_rtu(const TDArgs& td, const RTUArgs& cells) {
  Engine<T> engine(td);
  return rtu_step<T>(engine, cells);
}

}  // namespace

AGENTSTATE_ACTOR_CRITIC_ENTRIES(td_rtu, rtu_step, RTUArgs)

extern "C" {
int td_rtu_float32(const TDArgs* td, const RTUArgs* args) { return td_rtu<float>(*td, *args); }
int td_rtu_float64(const TDArgs* td, const RTUArgs* args) { return td_rtu<double>(*td, *args); }
}
