// The TD(lambda) engine shared by every compiled learner step (agentstate/fused.py).
//
// A learner's kernel is one C++ file that includes this header and defines, for T = float
// and double, an entry point `int <name>_float32(const TDArgs*, const <Args>*)` (and
// `_float64`): one call advances every stream by one step of agentstate.td.TDPredictor.step,
//
//   x^ = normalise(x); learner step -> h; phi = [normalise(h), x^?, 1?];
//   y = W_head phi; delta = (c + gamma y - y_prev) * has_prev;
//   optimiser steps of the heads and of the learner's parameters with delta * trace (traces
//   of the previous step); head_trace = gamma lambda head_trace + phi;
//   learner traces = gamma lambda traces + grad_learner(W_head[:n] / std_h),
//
// where gamma is per stream and cumulant (a scalar, one per stream, or one per stream and
// head: `td.discount_per_cumulant`); a learner's body reads gamma lambda as
// `engine.decay(b, q)` for stream b and cumulant q, never assuming the heads share it.
//
// returning 0. `Engine<T>` does everything but the learner's own part: normalisation, heads,
// TD error, head update, v, and the learner's optimisers and traces (one per parameter, in
// the order of the layout's parameters()). agentstate.fused generates `kernel_args.h` from
// its ctypes declarations (TDArgs, OptimizerArgs and the kernel's own argument struct), so
// the two sides cannot disagree, and checks the inputs' finiteness before the learner moves
// (`agentstate_inputs_finite_*` below): a kernel may assume finite inputs.
//
// Layouts are those of the eager tensors (contiguous, streams leading); parameters lead with
// P = 1 (shared: updates are the mean over streams) or P = B. Compiled with
// -ffp-contract=off so that every multiply and add rounds as the eager element-wise ops do;
// reductions (dot products, means) may differ in the last bit.
//
// Large steps may be split over up to `td.threads` threads (parallel_for, threads_for): split
// by columns, weight rows or streams, never inside a sum, so that every thread count gives
// bitwise the same result.

#pragma once

#include "kernel_args.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <thread>
#include <vector>

namespace {

using index = int64_t;

enum Optimizer : index { SGD = 0, RMSPROP_TD = 1, ADAM = 2 };
enum Gate : index { GATE_I = 0, GATE_F = 1, GATE_G = 2, GATE_O = 3, N_GATES = 4 };

// exp and tanh that vectorise in `omp simd` loops: with AGENTSTATE_LIBMVEC (glibc's vector
// math library, see agentstate/fused.py) the compiler calls its SIMD variants (<= 4 ulp);
// otherwise these are the scalar libm functions.
#ifdef AGENTSTATE_LIBMVEC
extern "C" {
#pragma omp declare simd notinbranch
float expf(float);
#pragma omp declare simd notinbranch
double exp(double);
#pragma omp declare simd notinbranch
float tanhf(float);
#pragma omp declare simd notinbranch
double tanh(double);
}
#endif
inline float vector_exp(float a) { return expf(a); }
inline double vector_exp(double a) { return exp(a); }
inline float vector_tanh(float a) { return tanhf(a); }
inline double vector_tanh(double a) { return tanh(a); }

template <typename T>
inline T sigmoid(T a) {
  return T(1) / (T(1) + vector_exp(-a));
}

template <typename T>
bool all_finite(const T* values, index count) {
  T zero = 0;  // x * 0 is 0 for every finite x, NaN for inf and NaN
#pragma omp simd reduction(+ : zero)
  for (index i = 0; i < count; ++i) zero += values[i] * T(0);
  return zero == T(0);
}

// sum_i a[i] b[i], vectorised (the order of the additions is the compiler's).
template <typename T>
T dot(const T* __restrict a, const T* __restrict b, index count) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (index i = 0; i < count; ++i) sum += a[i] * b[i];
  return sum;
}

// A 32-byte vector of T (GCC/Clang vector extension): element-wise + and * round each lane
// exactly as the scalar operations do.
template <typename T>
struct Vector {
  typedef T type __attribute__((vector_size(32)));
  static constexpr index lanes = 32 / sizeof(T);
  static type load(const T* from) {
    type value;
    std::memcpy(&value, from, sizeof(type));
    return value;
  }
  static void store(T* to, const type& value) { std::memcpy(to, &value, sizeof(type)); }
};

// out[j * out_stride + s] = sum_r coefficient[j * j_step + r * r_step] columns[r * w + s] for
// j < outputs and s < w: weighted sums of the rows of a [count, w] matrix, each summed over r
// in order (the same order, so the same bits, however the outputs are tiled). A tile of
// J outputs x VECTORS vectors of lanes is summed in registers: J x VECTORS independent
// chains hide the adds' latency, and each vector of a row serves J outputs.
template <index J, index VECTORS, typename T>
inline void combine_tile(T* __restrict out, index out_stride, const T* __restrict coefficient,
                         index j_step, index r_step, const T* __restrict columns, index count,
                         index w, index s) {
  using V = Vector<T>;
  typename V::type sum[J][VECTORS];
  for (index v = 0; v < VECTORS; ++v) {
    const typename V::type column = V::load(columns + s + v * V::lanes);
    for (index j = 0; j < J; ++j) sum[j][v] = coefficient[j * j_step] * column;
  }
  for (index r = 1; r < count; ++r) {
    for (index v = 0; v < VECTORS; ++v) {
      const typename V::type column = V::load(columns + r * w + s + v * V::lanes);
      for (index j = 0; j < J; ++j) sum[j][v] += coefficient[j * j_step + r * r_step] * column;
    }
  }
  for (index j = 0; j < J; ++j)
    for (index v = 0; v < VECTORS; ++v) V::store(out + j * out_stride + s + v * V::lanes, sum[j][v]);
}

// The lanes that do not fill a vector: J outputs of lane s, one scalar chain each.
template <index J, typename T>
inline void combine_lane(T* __restrict out, index out_stride, const T* __restrict coefficient,
                         index j_step, index r_step, const T* __restrict columns, index count,
                         index w, index s) {
  T sum[J];
  for (index j = 0; j < J; ++j) sum[j] = coefficient[j * j_step] * columns[s];
  for (index r = 1; r < count; ++r) {
    for (index j = 0; j < J; ++j) sum[j] += coefficient[j * j_step + r * r_step] * columns[r * w + s];
  }
  for (index j = 0; j < J; ++j) out[j * out_stride + s] = sum[j];
}

template <typename T>
inline void combine_columns(T* out, index out_stride, const T* coefficient, index j_step,
                            index r_step, const T* columns, index count, index w,
                            index outputs = 1) {
  constexpr index LANES = Vector<T>::lanes;
  index j = 0;
  for (; j + 4 <= outputs; j += 4) {  // 4 outputs x 1 vector
    T* out_j = out + j * out_stride;
    const T* coefficient_j = coefficient + j * j_step;
    index s = 0;
    for (; s + LANES <= w; s += LANES)
      combine_tile<4, 1>(out_j, out_stride, coefficient_j, j_step, r_step, columns, count, w, s);
    for (; s < w; ++s)
      combine_lane<4>(out_j, out_stride, coefficient_j, j_step, r_step, columns, count, w, s);
  }
  for (; j < outputs; ++j) {  // 1 output x 4 vectors, or x 1
    T* out_j = out + j * out_stride;
    const T* coefficient_j = coefficient + j * j_step;
    index s = 0;
    for (; s + 4 * LANES <= w; s += 4 * LANES)
      combine_tile<1, 4>(out_j, out_stride, coefficient_j, j_step, r_step, columns, count, w, s);
    for (; s + LANES <= w; s += LANES)
      combine_tile<1, 1>(out_j, out_stride, coefficient_j, j_step, r_step, columns, count, w, s);
    for (; s < w; ++s)
      combine_lane<1>(out_j, out_stride, coefficient_j, j_step, r_step, columns, count, w, s);
  }
}

// Shared-weight rows up to this long take the across-streams forward pass (the inner loop
// walks the streams); longer ones take per-stream dot products, which vectorise along the row.
constexpr index ACROSS_STREAMS_MAX_WIDTH = 64;

// ------------------------------------------------------------------ threads
// Threads worth starting for `work` entries: at most `threads`, each with >= `grain` of it.
inline index threads_for(const TDArgs& td, index work, index parts) {
  const index grain = std::max<index>(1, td.parallel_grain);
  return std::max<index>(1, std::min({index(td.threads), work / grain, parts}));
}

// body(begin, end) over `threads` contiguous slices of [0, count); slice 0 on this thread.
template <typename Body>
void parallel_for(index count, index threads, const Body& body) {
  threads = std::max<index>(1, std::min(threads, count));
  if (threads == 1) {
    body(index(0), count);
    return;
  }
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  for (index t = 1; t < threads; ++t) {
    workers.emplace_back([&body, count, threads, t] {
      body(count * t / threads, count * (t + 1) / threads);
    });
  }
  body(index(0), count / threads);
  for (std::thread& worker : workers) worker.join();
}

// ------------------------------------------------------------------ optimisers
// One parameter tensor's optimiser: `update` is the TD direction mean_b(delta * trace),
// i.e. minus torch's p.grad, so the formulas below are those of agentstate.optim and
// torch.optim with grad = -update.
template <typename T>
struct ParameterOptimizer {
  index kind;
  T lr;
  T* state_a;  // rmsprop_td: second moment; adam: exp_avg
  T* state_b;  // adam: exp_avg_sq
  T beta, one_minus_beta, eps;                       // rmsprop_td
  T beta1_weight, beta2, one_minus_beta2, adam_eps;  // adam
  T step_size, bias_correction2_sqrt;                // adam, this step

  ParameterOptimizer(const OptimizerArgs& args, double learning_rate, void* a, void* b,
                     void* step_count)
      : kind(args.kind), lr(T(learning_rate)), state_a(static_cast<T*>(a)),
        state_b(static_cast<T*>(b)), beta(T(args.beta)), one_minus_beta(T(1.0 - args.beta)),
        eps(T(args.eps)), beta1_weight(T(1.0 - args.beta1)), beta2(T(args.beta2)),
        one_minus_beta2(T(1.0 - args.beta2)), adam_eps(T(args.eps)), step_size(0),
        bias_correction2_sqrt(1) {
    if (kind == ADAM) {  // torch.optim.Adam: step += 1, then the bias corrections in double
      double step;
      if (args.step_is_double) {
        step = (*static_cast<double*>(step_count) += 1.0);
      } else {
        step = (*static_cast<float*>(step_count) += 1.0f);
      }
      double bias_correction1 = 1.0 - std::pow(args.beta1, step);
      double bias_correction2 = 1.0 - std::pow(args.beta2, step);
      step_size = T(learning_rate / bias_correction1);
      bias_correction2_sqrt = T(std::pow(bias_correction2, 0.5));
    }
  }

  // Apply to `count` consecutive entries starting at `offset`; update = sum / divisor.
  void apply(T* param, index offset, const T* update_sum, T divisor, index count) const {
    T* p = param + offset;
    if (kind == SGD) {
      for (index i = 0; i < count; ++i) p[i] = p[i] + lr * (update_sum[i] / divisor);
    } else if (kind == RMSPROP_TD) {
      T* v = state_a + offset;
      for (index i = 0; i < count; ++i) {
        T grad = -(update_sum[i] / divisor);
        v[i] = v[i] * beta;
        v[i] = v[i] + one_minus_beta * grad * grad;
        p[i] = p[i] + -lr * grad / (std::sqrt(v[i]) + eps);
      }
    } else {
      T* m = state_a + offset;
      T* v = state_b + offset;
      for (index i = 0; i < count; ++i) {
        T grad = -(update_sum[i] / divisor);
        m[i] = m[i] + beta1_weight * (grad - m[i]);
        v[i] = v[i] * beta2;
        v[i] = v[i] + one_minus_beta2 * grad * grad;
        T denominator = std::sqrt(v[i]) / bias_correction2_sqrt + adam_eps;
        p[i] = p[i] + -step_size * m[i] / denominator;
      }
    }
  }
};

// ------------------------------------------------------------------ normalisation
// agentstate.normalization.OnlineNormalizer: normalise with the statistics before the update.
template <typename T>
void normalize(const T* x, const T* mean, const T* variance, index streams, index param_streams,
               index size, T* out) {
  for (index b = 0; b < streams; ++b) {
    index p = param_streams == 1 ? 0 : b;
    for (index i = 0; i < size; ++i) {
      out[b * size + i] = (x[b * size + i] - mean[p * size + i]) / std::sqrt(variance[p * size + i]);
    }
  }
}

// Fold `x: [B, size]` (row stride `stride`) into EMA statistics `[P, size]`.
template <typename T>
void update_statistics(const T* x, index stride, index streams, index param_streams, index size,
                       double decay, double floor, T* mean, T* variance) {
  const T keep = T(decay), rate = T(1.0 - decay), minimum = T(floor);
  if (param_streams == 1) {
    std::vector<T> sample(size, T(0)), deviation(size, T(0));
    for (index b = 0; b < streams; ++b)
      for (index i = 0; i < size; ++i) sample[i] += x[b * stride + i];
    for (index i = 0; i < size; ++i) mean[i] = mean[i] * keep + rate * (sample[i] / T(streams));
    for (index b = 0; b < streams; ++b) {
      for (index i = 0; i < size; ++i) {
        T d = x[b * stride + i] - mean[i];
        deviation[i] += d * d;
      }
    }
    for (index i = 0; i < size; ++i) {
      variance[i] = variance[i] * keep + rate * (deviation[i] / T(streams));
      variance[i] = std::max(variance[i], minimum);
    }
  } else {
    for (index b = 0; b < streams; ++b) {
      T* m = mean + b * size;
      T* v = variance + b * size;
      for (index i = 0; i < size; ++i) {
        m[i] = m[i] * keep + rate * x[b * stride + i];
        T d = x[b * stride + i] - m[i];
        v[i] = std::max(v[i] * keep + rate * (d * d), minimum);
      }
    }
  }
}

// ------------------------------------------------------------------ the TD engine
// Everything of a TD step that does not depend on the learner's kind.
template <typename T>
struct Engine {
  using value_type = T;
  const TDArgs& td;
  index B, P, d, n, K, F;
  std::vector<T> observation;   // x^: [B, d]
  std::vector<T> features;      // phi: [B, F]
  std::vector<T> delta;         // [B, K]
  std::vector<T> trace_decays;  // gamma lambda: [B, K]; read through decay(b, q)
  std::vector<T> feature_std;   // std_h before this step's update: [P, n]
  std::vector<T> state_weight;  // W_head[p, k, :n] / std_h: [P, K, n]

  explicit Engine(const TDArgs& args)
      : td(args), B(args.streams), P(args.param_streams), d(args.input_size),
        n(args.n_features), K(args.n_cumulants), F(args.n_head_features),
        observation(B * d), features(B * F), delta(B * K), trace_decays(B * K), feature_std(P * n),
        state_weight(P * K * n) {}

  // gamma of stream b and cumulant k: the scalar, the stream's, or the stream's and head's.
  T gamma(index b, index k) const {
    if (!td.discount) return T(td.gamma);
    return static_cast<const T*>(td.discount)[td.discount_per_cumulant ? b * K + k : b];
  }

  // gamma lambda of stream b and cumulant q: the decay of that head's traces.
  T decay(index b, index q) const { return trace_decays[b * K + q]; }

  void normalize_observation() {
    auto* mean = static_cast<T*>(td.input_mean);
    auto* variance = static_cast<T*>(td.input_variance);
    normalize(static_cast<const T*>(td.x), mean, variance, B, P, d, observation.data());
    if (td.input_decay != 1.0) {
      update_statistics(static_cast<const T*>(td.x), d, B, P, d, td.input_decay, td.input_floor,
                        mean, variance);
    }
  }

  // From the agent state h: [B, n], form phi, predict, and form delta.
  void predict(const T* h) {
    auto* mean = static_cast<T*>(td.feature_mean);
    auto* variance = static_cast<T*>(td.feature_variance);
    for (index i = 0; i < P * n; ++i) feature_std[i] = std::sqrt(variance[i]);
    for (index b = 0; b < B; ++b) {
      index p = P == 1 ? 0 : b;
      T* phi = features.data() + b * F;
      for (index j = 0; j < n; ++j) phi[j] = (h[b * n + j] - mean[p * n + j]) / feature_std[p * n + j];
      index f = n;
      if (td.include_observation) {
        for (index i = 0; i < d; ++i) phi[f++] = observation[b * d + i];
      }
      if (td.include_bias) phi[f] = T(1);
    }
    if (td.feature_decay != 1.0) {
      update_statistics(h, n, B, P, n, td.feature_decay, td.feature_floor, mean, variance);
    }
    auto* head = static_cast<const T*>(td.head_weight);
    auto* prediction = static_cast<T*>(td.prediction);
    auto* previous = static_cast<const T*>(td.previous_prediction);
    auto* has_previous = static_cast<const bool*>(td.has_previous);
    auto* cumulant = static_cast<const T*>(td.cumulant);
    for (index b = 0; b < B; ++b) {
      index p = P == 1 ? 0 : b;
      for (index k = 0; k < K; ++k) {
        const T g = gamma(b, k);
        trace_decays[b * K + k] = g * T(td.lambda_);
        const T* w = head + (p * K + k) * F;
        const T* phi = features.data() + b * F;
        T y = 0;
        for (index f = 0; f < F; ++f) y += phi[f] * w[f];
        prediction[b * K + k] = y;
        T error = cumulant[b * K + k] + g * y - previous[b * K + k];
        delta[b * K + k] = error * T(has_previous[b] ? 1 : 0);
      }
    }
  }

  // Optimiser step of the heads with the old head trace, then decay the trace and add phi.
  void update_heads() {
    auto* head = static_cast<T*>(td.head_weight);
    auto* trace = static_cast<T*>(td.head_trace);
    ParameterOptimizer<T> optimizer(td.optimizer, td.head_step_size, td.head_state_a, td.head_state_b,
                                    td.head_step);
    std::vector<T> update(K * F, T(0));
    for (index b = 0; b < B; ++b) {
      if (P != 1) std::fill(update.begin(), update.end(), T(0));
      for (index k = 0; k < K; ++k)
        for (index f = 0; f < F; ++f) {
          update[k * F + f] += delta[b * K + k] * trace[(b * K + k) * F + f];
        }
      if (P != 1) optimizer.apply(head, b * K * F, update.data(), T(1), K * F);
    }
    if (P == 1) optimizer.apply(head, 0, update.data(), T(B), K * F);
    for (index b = 0; b < B; ++b)
      for (index k = 0; k < K; ++k)
        for (index f = 0; f < F; ++f) {
          T& e = trace[(b * K + k) * F + f];
          e = e * trace_decays[b * K + k] + features[b * F + f];
        }
  }

  // v = W_head[p, k, :n] / std_h with the updated heads: what the learner's gradient weighs.
  void learner_state_weight() {
    auto* head = static_cast<const T*>(td.head_weight);
    for (index p = 0; p < P; ++p)
      for (index k = 0; k < K; ++k)
        for (index j = 0; j < n; ++j) {
          state_weight[(p * K + k) * n + j] = head[(p * K + k) * F + j] / feature_std[p * n + j];
        }
  }

  T v(index b, index k, index j) const {
    return state_weight[((P == 1 ? 0 : b) * K + k) * n + j];
  }

  void finish() {
    std::memcpy(td.previous_prediction, td.prediction, sizeof(T) * B * K);
    std::fill_n(static_cast<bool*>(td.has_previous), B, true);
  }

  // The optimiser of the learner's parameter `parameter` (its position in the layout's
  // parameters()), and that parameter's traces [K, B, ...]. Only while td.train_learner:
  // otherwise the engine passes neither.
  ParameterOptimizer<T> learner_optimizer(index parameter = 0) const {
    return ParameterOptimizer<T>(td.optimizer, td.learner_step_size,
                                 learner_array(td.learner_states_a, parameter),
                                 learner_array(td.learner_states_b, parameter),
                                 learner_array(td.learner_steps, parameter));
  }

  T* learner_trace(index parameter = 0) const {
    return static_cast<T*>(learner_array(td.learner_traces, parameter));
  }

  static void* learner_array(void* array, index parameter) {
    return array == nullptr ? nullptr : static_cast<void**>(array)[parameter];
  }
};

}  // namespace

// 1 if every input of this step (x, cumulant, discount) is finite, else 0.
template <typename T>
int agentstate_inputs_finite(const TDArgs& td) {
  const int64_t B = td.streams;
  return all_finite(static_cast<const T*>(td.x), B * td.input_size) &&
         all_finite(static_cast<const T*>(td.cumulant), B * td.n_cumulants) &&
         (td.discount == nullptr ||
          all_finite(static_cast<const T*>(td.discount),
                     td.discount_per_cumulant ? B * td.n_cumulants : B));
}

extern "C" {
int agentstate_inputs_finite_float32(const TDArgs* td) {
  return agentstate_inputs_finite<float>(*td);
}
int agentstate_inputs_finite_float64(const TDArgs* td) {
  return agentstate_inputs_finite<double>(*td);
}
}
