// leaky_echo's compiled TD step: the learner's part of agentstate.td.TDPredictor.step, with
// the shared engine (<agentstate/engine.h>: normalisation, heads, TD error, optimisers,
// traces) doing the rest. agentstate.fused compiles it at first use; LeakyEchoArgs is
// generated from the ctypes declaration in plugin.py.
//
// Per stream b and feature j, with z = [x^, 1] (the engine's normalised observation):
//   a_j = tanh(W_j . z);  h_j = leak h_j + (1 - leak) a_j;
//   S_j = leak S_j + (1 - leak)(1 - a_j^2) z          (dh_j / dW_j, exact)
// then, after the engine's heads and TD error: W += step(delta * trace) with the previous
// traces, and trace = gamma lambda trace + v_j S_j.
//
// The body is written against the engine's interface, so the same code also runs inside the
// actor-critic engine (<agentstate/actor_critic.h>): AGENTSTATE_ACTOR_CRITIC_ENTRIES below
// gives agentstate.rl.RTRLActorCritic a compiled step with a leaky_echo core.

#include <agentstate/actor_critic.h>

namespace {

template <typename T, typename E>
int leaky_echo_step(E& engine, const LeakyEchoArgs& args) {
  const TDArgs& td = engine.td;
  const index B = engine.B, P = engine.P, d = engine.d, n = engine.n, K = engine.K;
  const index m = d + 1;      // a weight row: the inputs and the bias
  const index block = n * m;  // one stream's weights (or sensitivities)
  auto* weight = static_cast<T*>(args.weight);            // [P, n, m]
  auto* h = static_cast<T*>(args.h);                      // [B, n]
  auto* sensitivity = static_cast<T*>(args.sensitivity);  // [B, n, m]
  const T leak = T(args.leak);

  engine.normalize_observation();
  std::vector<T> z(m);
  for (index b = 0; b < B; ++b) {
    std::copy_n(engine.observation.data() + b * d, d, z.data());
    z[d] = T(1);
    const T* w = weight + (P == 1 ? 0 : b) * block;
    for (index j = 0; j < n; ++j) {
      const T a = std::tanh(dot(w + j * m, z.data(), m));
      h[b * n + j] = leak * h[b * n + j] + (T(1) - leak) * a;
      const T local = (T(1) - leak) * (T(1) - a * a);
      T* s = sensitivity + b * block + j * m;
      for (index i = 0; i < m; ++i) s[i] = leak * s[i] + local * z[i];
    }
  }

  engine.predict(h);
  engine.update_heads();
  engine.learner_state_weight();
  if (td.train_learner) {
    const ParameterOptimizer<T> optimizer = engine.learner_optimizer();
    T* trace = engine.learner_trace();  // [K, B, n, m]
    std::vector<T> update(block, T(0));
    for (index b = 0; b < B; ++b) {
      if (P != 1) std::fill(update.begin(), update.end(), T(0));
      for (index q = 0; q < K; ++q) {
        const T error = engine.delta[b * K + q], decay = engine.decay(b, q);
        T* e = trace + (q * B + b) * block;
        const T* s = sensitivity + b * block;
        for (index j = 0; j < n; ++j) {
          const T v = engine.v(b, q, j);
          for (index i = 0; i < m; ++i) {
            update[j * m + i] += error * e[j * m + i];
            e[j * m + i] = e[j * m + i] * decay + v * s[j * m + i];
          }
        }
      }
      if (P != 1) optimizer.apply(weight, b * block, update.data(), T(1), block);
    }
    if (P == 1) optimizer.apply(weight, 0, update.data(), T(B), block);
  }
  engine.finish();
  return 0;
}

template <typename T>
int td_leaky_echo(const TDArgs& td, const LeakyEchoArgs& args) {
  Engine<T> engine(td);
  return leaky_echo_step<T>(engine, args);
}

}  // namespace

AGENTSTATE_ACTOR_CRITIC_ENTRIES(td_leaky_echo, leaky_echo_step, LeakyEchoArgs)

extern "C" {
int td_leaky_echo_float32(const TDArgs* td, const LeakyEchoArgs* args) {
  return td_leaky_echo<float>(*td, *args);
}
int td_leaky_echo_float64(const TDArgs* td, const LeakyEchoArgs* args) {
  return td_leaky_echo<double>(*td, *args);
}
}
