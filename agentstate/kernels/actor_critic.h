// The streaming actor-critic step shared by every compiled learner (agentstate/rl/fused_step.py).
//
// A learner's kernel body is written against an engine (engine.h: `Engine<T>`, the TD(lambda)
// predictor). `ActorCriticEngine<T>` offers the same interface, so the same body, unchanged,
// runs one step of agentstate.rl.RTRLActorCritic for every stream: a kernel opts in with
//
//   AGENTSTATE_ACTOR_CRITIC_ENTRIES(<entry>, <body>, <Args>)
//
// which defines `int <entry>_actor_critic_float32(const ACArgs*, const <Args>*)` (and
// `_float64`). One call takes the transition that just happened (observation o_t+1, reward
// r_t+1, done, the bootstrap value of truncated episodes) and returns the next action:
//
//   x = [normalise(o_t+1), a_t (0 where done)];  learner step -> h_t+1 (sensitivities too)
//   delta_t = r~ + gamma (done ? bootstrap : w . phi_t+1) - v_t     (old heads)
//   ObGD steps of critic, actor (+ entropy bonus at s_t) and core with the traces of s_t
//   traces: z = (done ? 0 : gamma lambda) z + grad at s_t+1, grad of the core from
//   learner.grad(w[:n] + d log pi(a_t+1 | s_t+1) / d h)  (the body's sweep)
//   v_t+1 = w . phi_t+1, a_t+1 ~ pi(. | s_t+1)                       (new heads)
//
// exactly the eager order of RTRLActorCritic._agent_step, element by element (module
// docstring there). The body sees: `delta[b]` = alpha_b delta_b of the core's ObGD step (its
// update is `sum_b delta[b] z_b / B` with plain SGD at step size 1), `decay(b, 0)`,
// `v(b, 0, j)`, `learner_trace(i)`, and `td` with `x` (the learner's input), `threads`,
// `parallel_grain` and `train_learner`, which the engine clears, so that no parameter moves,
// when the step has to be refused (status below).
//
// The caller checks the inputs first (agentstate_actor_critic_inputs_finite below; status 1
// is its answer), so the step may assume them finite. Status: 0 done; 2 the core's state is not
// finite; 3 the TD error or an eligibility trace is not finite (2 and 3: the recurrent state
// moved, no parameter did); 4 the policy's scores or actions are not finite (the heads took
// their step, no trace moved and no action was written).

#pragma once

#include <agentstate/engine.h>

namespace {

enum ActorCriticStatus : int {
  AC_DONE = 0, AC_STATE_NOT_FINITE = 2, AC_UPDATE_NOT_FINITE = 3,
  AC_POLICY_NOT_FINITE = 4
};

template <typename T>
struct ActorCriticEngine {
  using value_type = T;
  const ACArgs& ac;
  TDArgs td;  // the part of the TD engine's arguments a learner's body reads
  index B, P, d, n, K, A, F, d_obs;
  int status;
  bool started;  // a transition to learn from (false on the first call)
  std::vector<T> observation;  // the learner's input x: [B, d]
  std::vector<T> features;     // phi_t+1: [B, F]
  std::vector<T> delta;        // alpha_b delta_b of the core: [B]
  std::vector<T> td_error;     // delta_b: [B]
  std::vector<T> trace_decay;  // gamma lambda, 0 where done: [B]
  std::vector<T> core_v;       // w[:n] + d log pi / d h: [B, n]
  std::vector<T> critic_taken, actor_taken;  // [B]
  double value_mean;                         // mean_b v_t, for the log
  OptimizerArgs plain_sgd;

  explicit ActorCriticEngine(const ACArgs& args)
      : ac(args), td(), B(args.streams), P(args.param_streams),
        d(args.observation_size + (args.include_prev_action ? args.n_actions : 0)),
        n(args.n_features), K(1), A(args.n_actions), F(args.n_head_features),
        d_obs(args.observation_size), status(AC_DONE),
        started(*static_cast<const bool*>(args.started)), observation(B * d), features(B * F),
        delta(B, T(0)), td_error(B, T(0)), trace_decay(B), core_v(B * n, T(0)),
        critic_taken(B, T(0)), actor_taken(B, T(0)), value_mean(0), plain_sgd() {
    td.streams = B;
    td.param_streams = P;
    td.input_size = d;
    td.n_features = n;
    td.n_cumulants = 1;
    td.threads = args.threads;
    td.parallel_grain = args.parallel_grain;
    td.train_learner = args.train_learner;
    td.x = observation.data();
    plain_sgd.kind = SGD;
  }

  const bool* done() const { return static_cast<const bool*>(ac.done); }

  // x = [normalise(o), a_t]: the running statistics first take in this batch (Chan et al.).
  void normalize_observation() {
    const auto* o = static_cast<const double*>(ac.observation);
    auto* count = static_cast<double*>(ac.observation_count);
    auto* mean = static_cast<double*>(ac.observation_mean);
    auto* m2 = static_cast<double*>(ac.observation_m2);
    if (ac.normalize_observations) fold_in(o, d_obs, count, mean, m2);
    const double samples = std::max(*count, 1.0);
    const auto* action = static_cast<const T*>(ac.action_input);
    for (index b = 0; b < B; ++b) {
      T* x = observation.data() + b * d;
      for (index i = 0; i < d_obs; ++i) {
        const double value = o[b * d_obs + i];
        x[i] = ac.normalize_observations
            ? T((value - mean[i]) / std::sqrt(m2[i] / samples + ac.observation_eps))
            : T(value);
      }
      if (ac.include_prev_action) {
        const bool fresh = started && done()[b];
        for (index k = 0; k < A; ++k) x[d_obs + k] = fresh ? T(0) : action[b * A + k];
      }
    }
  }

  // From h_t+1: phi, the TD error of the transition (old heads) and ObGD's step sizes.
  void predict(const T* h) {
    if (!all_finite(h, B * n)) {
      fail(AC_STATE_NOT_FINITE);
      return;
    }
    for (index b = 0; b < B; ++b) {
      T* phi = features.data() + b * F;
      std::copy_n(h + b * n, n, phi);
      index f = n;
      if (ac.include_observation) {
        for (index i = 0; i < d_obs; ++i) phi[f++] = observation[b * d + i];
      }
      phi[f] = T(1);
    }
    if (!started) return;
    const auto* reward = static_cast<const double*>(ac.reward);
    const auto* bootstrap = static_cast<const T*>(ac.bootstrap);
    const auto* previous_value = static_cast<const T*>(ac.previous_value);
    const auto* critic = static_cast<const T*>(ac.critic_weight);
    std::vector<T> scaled(B);
    scale_rewards(reward, scaled.data());
    for (index b = 0; b < B; ++b) {
      const T next = done()[b] ? bootstrap[b] : value(critic, b);
      td_error[b] = scaled[b] + T(ac.gamma) * next - previous_value[b];
      value_mean += double(previous_value[b]) / double(B);
    }
    std::vector<T> critic_norm(B, T(0)), actor_norm(B, T(0)), core_norm(B, T(0));
    add_norms(static_cast<const T*>(ac.critic_trace), F, critic_norm.data());
    add_norms(static_cast<const T*>(ac.actor_trace), A * F, actor_norm.data());
    if (!ac.discrete) add_norms(static_cast<const T*>(ac.log_std_trace), A, actor_norm.data());
    const auto* sizes = static_cast<const int64_t*>(ac.core_trace_sizes);
    for (index i = 0; i < ac.n_core_parameters; ++i) {
      add_norms(static_cast<const T*>(static_cast<void**>(ac.core_traces)[i]), sizes[i],
                core_norm.data());
    }
    if (!all_finite(td_error.data(), B) || !all_finite(critic_norm.data(), B) ||
        !all_finite(actor_norm.data(), B) || !all_finite(core_norm.data(), B)) {
      fail(AC_UPDATE_NOT_FINITE);
      return;
    }
    for (index b = 0; b < B; ++b) {
      critic_taken[b] = obgd_step(ac.critic_step_size, ac.critic_kappa, td_error[b], critic_norm[b]);
      actor_taken[b] = obgd_step(ac.actor_step_size, ac.actor_kappa, td_error[b], actor_norm[b]);
      delta[b] = obgd_step(ac.learner_step_size, ac.learner_kappa, td_error[b], core_norm[b]) *
                 td_error[b];
    }
  }

  // The heads' ObGD steps, then everything at s_t+1: value, action, gradients and traces.
  void update_heads() {
    if (status != AC_DONE) return;
    auto* critic = static_cast<T*>(ac.critic_weight);
    auto* actor = static_cast<T*>(ac.actor_weight);
    auto* log_std = static_cast<T*>(ac.log_std);
    auto* critic_trace = static_cast<T*>(ac.critic_trace);
    auto* actor_trace = static_cast<T*>(ac.actor_trace);
    auto* log_std_trace = static_cast<T*>(ac.log_std_trace);
    auto* previous_features = static_cast<T*>(ac.previous_features);
    auto* entropy_score = static_cast<T*>(ac.previous_entropy_score);
    const T decay = T(ac.gamma) * T(ac.lambda_);
    for (index b = 0; b < B; ++b) trace_decay[b] = started && done()[b] ? T(0) : decay;
    if (started) {
      std::vector<T> critic_scale(B), actor_scale(B);
      for (index b = 0; b < B; ++b) {
        critic_scale[b] = critic_taken[b] * td_error[b];
        actor_scale[b] = actor_taken[b] * td_error[b];
      }
      obgd_apply(critic, critic_trace, critic_scale.data(), F);
      obgd_apply(actor, actor_trace, actor_scale.data(), A * F);
      if (!ac.discrete) obgd_apply(log_std, log_std_trace, actor_scale.data(), A);
      if (ac.entropy_coefficient != 0.0) entropy_bonus(actor, log_std, previous_features, entropy_score);
      if (!ac.discrete) clamp_log_std(log_std);
    }

    const auto* noise = static_cast<const T*>(ac.noise);
    auto* action_input = static_cast<T*>(ac.action_input);
    auto* previous_value = static_cast<T*>(ac.previous_value);
    // Every stream's scores (logits, or the Gaussian's mean) and spread first: a policy that
    // is not finite stops the step before any trace or action is written.
    std::vector<T> all_scores(B * A), spread(ac.discrete ? 0 : B * A);
    for (index b = 0; b < B; ++b) {
      const index p = P == 1 ? 0 : b;
      for (index k = 0; k < A; ++k) {
        all_scores[b * A + k] = dot_ordered(features.data() + b * F, actor + (p * A + k) * F, F);
        if (!ac.discrete) spread[b * A + k] = std::exp(log_std[p * A + k]) * noise[b * A + k];
      }
    }
    if (!all_finite(all_scores.data(), B * A) || !all_finite(spread.data(), index(spread.size()))) {
      fail(AC_POLICY_NOT_FINITE);
      return;
    }
    std::vector<T> score(A), log_p(A);
    // Box actions: the clip range and the map to [-1, 1] of what the core sees (ActionBounds).
    const auto* action_low = static_cast<const double*>(ac.action_low);
    const auto* action_high = static_cast<const double*>(ac.action_high);
    const auto* action_scale = static_cast<const double*>(ac.action_scale);
    const auto* action_offset = static_cast<const double*>(ac.action_offset);
    for (index b = 0; b < B; ++b) {
      const index p = P == 1 ? 0 : b;
      const T* phi = features.data() + b * F;
      previous_value[b] = value(critic, b);
      const T* W = actor + p * A * F;
      const T* scores = all_scores.data() + b * A;
      T* a_in = action_input + b * A;
      if (ac.discrete) {
        // log_softmax, then the inverse CDF of the probabilities at the uniform noise[b].
        T top = scores[0];
        for (index k = 1; k < A; ++k) top = std::max(top, scores[k]);
        T total = 0;
        for (index k = 0; k < A; ++k) total += std::exp(scores[k] - top);
        const T log_total = std::log(total);
        for (index k = 0; k < A; ++k) log_p[k] = scores[k] - top - log_total;
        index chosen = A - 1;
        T cumulative = 0;
        for (index k = 0; k < A; ++k) {
          cumulative += std::exp(log_p[k]);
          if (noise[b] < cumulative) {
            chosen = k;
            break;
          }
        }
        static_cast<int64_t*>(ac.action)[b] = chosen;
        T entropy = 0;
        for (index k = 0; k < A; ++k) entropy += std::exp(log_p[k]) * log_p[k];
        entropy = -entropy;
        for (index k = 0; k < A; ++k) {
          const T probability = std::exp(log_p[k]);
          a_in[k] = k == chosen ? T(1) : T(0);
          score[k] = a_in[k] - probability;
          entropy_score[b * A + k] = -probability * (log_p[k] + entropy);
        }
      } else {
        const T* log_sigma = log_std + p * A;
        T* action = static_cast<T*>(ac.action) + b * A;
        T* e_log_std = log_std_trace + b * A;
        for (index k = 0; k < A; ++k) {
          action[k] = scores[k] + spread[b * A + k];
          // The core sees the action as the env executes it: clipped, then mapped to [-1, 1].
          const T clipped = std::clamp(action[k], T(action_low[k]), T(action_high[k]));
          a_in[k] = clipped * T(action_scale[k]) + T(action_offset[k]);
          const T variance = std::exp(T(2) * log_sigma[k]);
          const T deviation = action[k] - scores[k];
          score[k] = deviation / variance;
          e_log_std[k] = e_log_std[k] * trace_decay[b] + (deviation * deviation / variance - T(1));
        }
      }
      T* z_critic = critic_trace + b * F;
      for (index f = 0; f < F; ++f) z_critic[f] = z_critic[f] * trace_decay[b] + phi[f];
      T* z_actor = actor_trace + b * A * F;
      for (index k = 0; k < A; ++k)
        for (index f = 0; f < F; ++f) {
          z_actor[k * F + f] = z_actor[k * F + f] * trace_decay[b] + score[k] * phi[f];
        }
      std::copy_n(phi, F, previous_features + b * F);
      const T* w = critic + p * F;
      for (index j = 0; j < n; ++j) {
        T d_log_pi = 0;
        for (index k = 0; k < A; ++k) d_log_pi += score[k] * W[k * F + j];
        core_v[b * n + j] = w[j] + d_log_pi;
      }
    }
  }

  void learner_state_weight() {}

  T v(index b, index, index j) const { return core_v[b * n + j]; }

  T decay(index b, index) const { return trace_decay[b]; }

  ParameterOptimizer<T> learner_optimizer(index = 0) const {
    return ParameterOptimizer<T>(plain_sgd, 1.0, nullptr, nullptr, nullptr);
  }

  T* learner_trace(index parameter = 0) const {
    return static_cast<T*>(static_cast<void**>(ac.core_traces)[parameter]);
  }

  void finish() {
    if (status != AC_DONE) return;
    if (started) {
      auto* sums = static_cast<double*>(ac.statistics);  // sums of mean delta^2, mean v_t; steps
      double squared = 0;
      for (index b = 0; b < B; ++b) squared += double(td_error[b]) * double(td_error[b]);
      sums[0] += squared / double(B);
      sums[1] += value_mean;
      sums[2] += 1.0;
    }
    *static_cast<bool*>(ac.started) = true;
  }

 private:
  void fail(int code) {
    status = code;
    td.train_learner = 0;
  }

  T value(const T* critic, index b) const {
    return dot_ordered(features.data() + b * F, critic + (P == 1 ? 0 : b) * F, F);
  }

  // sum_i a[i] b[i] from i = 0 up, as torch's small CPU matmul sums.
  static T dot_ordered(const T* a, const T* b, index count) {
    T sum = 0;
    for (index i = 0; i < count; ++i) sum += a[i] * b[i];
    return sum;
  }

  static T obgd_step(double step_size, double kappa, T error, T trace_norm) {
    const T alpha = T(step_size);
    const T bound = alpha * T(kappa) * std::max(std::abs(error), T(1)) * trace_norm;
    return alpha / std::max(bound, T(1));
  }

  void add_norms(const T* trace, index size, T* norm) const {
    for (index b = 0; b < B; ++b) {
      T sum = 0;
      for (index i = 0; i < size; ++i) sum += std::abs(trace[b * size + i]);
      norm[b] += sum;
    }
  }

  // param += mean_b(scale_b z_b) (shared) or scale_b z_b (per stream).
  void obgd_apply(T* param, const T* trace, const T* scale, index size) const {
    if (P == 1) {
      std::vector<T> sum(size, T(0));
      for (index b = 0; b < B; ++b)
        for (index i = 0; i < size; ++i) sum[i] += scale[b] * trace[b * size + i];
      for (index i = 0; i < size; ++i) param[i] += sum[i] / T(B);
    } else {
      for (index b = 0; b < B; ++b)
        for (index i = 0; i < size; ++i) param[b * size + i] += scale[b] * trace[b * size + i];
    }
  }

  // Box actions: each log-std back into [log_std_low, log_std_high] (shared or per stream).
  void clamp_log_std(T* log_std) const {
    const auto* low = static_cast<const double*>(ac.log_std_low);
    const auto* high = static_cast<const double*>(ac.log_std_high);
    const index rows = P == 1 ? 1 : B;
    for (index p = 0; p < rows; ++p)
      for (index k = 0; k < A; ++k) {
        T& value = log_std[p * A + k];
        value = std::clamp(value, T(low[k]), T(high[k]));
      }
  }

  // W += tau alpha_actor dH(pi(s_t))/dW: entropy score x phi_t (discrete), d/d log_std = 1 (box).
  void entropy_bonus(T* actor, T* log_std, const T* previous_features,
                     const T* entropy_score) const {
    std::vector<T> scale(B);
    for (index b = 0; b < B; ++b) scale[b] = T(ac.entropy_coefficient) * actor_taken[b];
    if (ac.discrete) {
      std::vector<T> gradient(B * A * F);
      for (index b = 0; b < B; ++b)
        for (index k = 0; k < A; ++k)
          for (index f = 0; f < F; ++f) {
            gradient[(b * A + k) * F + f] =
                entropy_score[b * A + k] * previous_features[b * F + f];
          }
      obgd_apply(actor, gradient.data(), scale.data(), A * F);
    } else {
      std::vector<T> ones(B * A, T(1));
      obgd_apply(log_std, ones.data(), scale.data(), A);
    }
  }

  // The discounted-return scaling of rewards (agentstate.rl.streaming.RewardScaler).
  void scale_rewards(const double* reward, T* scaled) const {
    if (!ac.scale_rewards) {
      for (index b = 0; b < B; ++b) scaled[b] = T(reward[b]);
      return;
    }
    auto* running = static_cast<double*>(ac.reward_sum);
    for (index b = 0; b < B; ++b) running[b] = ac.gamma * running[b] + reward[b];
    auto* count = static_cast<double*>(ac.reward_count);
    auto* mean = static_cast<double*>(ac.reward_mean);
    auto* m2 = static_cast<double*>(ac.reward_m2);
    fold_in(running, 1, count, mean, m2);
    const double scale = std::sqrt(m2[0] / std::max(*count, 1.0) + ac.reward_eps);
    for (index b = 0; b < B; ++b) {
      scaled[b] = T(reward[b] / scale);
      if (done()[b]) running[b] = 0.0;
    }
  }

  // Fold the batch values [B, size] into (count, mean, m2) (RunningMeanStd.update).
  void fold_in(const double* values, index size, double* count, double* mean, double* m2) const {
    const double n_batch = double(B), total = *count + n_batch;
    for (index i = 0; i < size; ++i) {
      double batch_mean = 0;
      for (index b = 0; b < B; ++b) batch_mean += values[b * size + i];
      batch_mean /= n_batch;
      double squares = 0;
      for (index b = 0; b < B; ++b) {
        const double deviation = values[b * size + i] - batch_mean;
        squares += deviation * deviation;
      }
      const double shift = batch_mean - mean[i];
      mean[i] += shift * (n_batch / total);
      m2[i] += squares + shift * shift * (*count * n_batch / total);
    }
    *count = total;
  }
};

}  // namespace

// 1 if the call's observation and reward (float64, whatever the kernel's dtype) are finite:
// checked before the learner's begin_step(), so that a refused step starts nothing.
extern "C" int agentstate_actor_critic_inputs_finite(const ACArgs* ac) {
  return all_finite(static_cast<const double*>(ac->observation),
                    ac->streams * ac->observation_size) &&
         all_finite(static_cast<const double*>(ac->reward), ac->streams);
}

// One actor-critic step through a learner body `BODY<T>(engine, args)` (see the top).
#define AGENTSTATE_ACTOR_CRITIC_ENTRY(ENTRY, BODY, ARGS, T, SUFFIX)                      \
  extern "C" int ENTRY##_actor_critic_##SUFFIX(const ACArgs* ac, const ARGS* args) {     \
    ActorCriticEngine<T> engine(*ac);                                                   \
    BODY<T>(engine, *args);                                                             \
    return engine.status;                                                               \
  }

#define AGENTSTATE_ACTOR_CRITIC_ENTRIES(ENTRY, BODY, ARGS)       \
  AGENTSTATE_ACTOR_CRITIC_ENTRY(ENTRY, BODY, ARGS, float, float32) \
  AGENTSTATE_ACTOR_CRITIC_ENTRY(ENTRY, BODY, ARGS, double, float64)
