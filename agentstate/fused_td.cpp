// Fused TD(lambda) steps: one call advances every stream by one step of agentstate.td.
//
// Built and loaded by agentstate/fused.py, which prepends the argument structs (generated
// from its ctypes declarations, so the two sides cannot disagree). Each entry point does,
// in order, exactly what TDPredictor.step does eagerly (see agentstate/td.py):
//
//   x^ = normalise(x); learner step on x^ -> h; phi = [normalise(h), x^?, 1?];
//   y = W_head phi; delta = (c + gamma y - y_prev) * has_prev;
//   optimiser step of the heads and the learner's weight with delta * trace (traces of
//   the previous step); head_trace = gamma lambda head_trace + phi;
//   learner_trace = gamma lambda learner_trace + grad_learner(W_head[:n] / std_h).
//
// The learner's part is fused into the sweep over its sensitivities (or window) so that
// every large array (sensitivities, traces, weights, optimiser state) is read and written
// once per step. Layouts are those of the eager tensors (all contiguous, streams leading);
// parameters lead with P = 1 (shared: updates are the mean over streams) or P = B.
// Compiled with -ffp-contract=off so that every multiply and add rounds as the eager
// element-wise ops do; reductions (dot products, means) may differ in the last bit.
//
// Large steps are split over up to `td.threads` threads (std::thread, started per call, so
// only when each gets at least `td.parallel_grain` parameter-stream entries of work). The
// split is by columns, weight rows or streams, never inside a sum, so every thread count
// gives bitwise the same result.

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
  const TDArgs& td;
  index B, P, d, n, K, F;
  std::vector<T> observation;   // x^: [B, d]
  std::vector<T> features;      // phi: [B, F]
  std::vector<T> delta;         // [B, K]
  std::vector<T> trace_decay;   // gamma lambda: [B]
  std::vector<T> feature_std;   // std_h before this step's update: [P, n]
  std::vector<T> state_weight;  // W_head[p, k, :n] / std_h: [P, K, n]

  explicit Engine(const TDArgs& args)
      : td(args), B(args.streams), P(args.param_streams), d(args.input_size),
        n(args.n_features), K(args.n_cumulants), F(args.n_head_features),
        observation(B * d), features(B * F), delta(B * K), trace_decay(B), feature_std(P * n),
        state_weight(P * K * n) {}

  // 0 if every input is finite; nothing is touched otherwise.
  bool inputs_finite() const {
    return all_finite(static_cast<const T*>(td.x), B * d) &&
           all_finite(static_cast<const T*>(td.cumulant), B * K) &&
           (td.discount == nullptr || all_finite(static_cast<const T*>(td.discount), B));
  }

  T gamma(index b) const {
    return td.discount ? static_cast<const T*>(td.discount)[b] : T(td.gamma);
  }

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
      T g = gamma(b);
      trace_decay[b] = g * T(td.lambda_);
      for (index k = 0; k < K; ++k) {
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
    ParameterOptimizer<T> optimizer(td.optimizer, td.head_lr, td.head_state_a, td.head_state_b,
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
          e = e * trace_decay[b] + features[b * F + f];
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

  ParameterOptimizer<T> learner_optimizer() const {
    return ParameterOptimizer<T>(td.optimizer, td.learner_lr, td.learner_state_a,
                                 td.learner_state_b, td.learner_step);
  }
};

// ------------------------------------------------------------------ columns (columnar, CCN)
// Ask for the entries `PREFETCH_BYTES` past this block of each array: with short rows the
// hardware prefetcher alone falls behind once the arrays live in main memory, and with long
// ones 16 KB ahead beat 4 KB by 10-15% (1 KB and 32 KB measured too).
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

// Rows up to this long take the across-streams forward pass (see td_columns).
constexpr index ACROSS_STREAMS_MAX_WIDTH = 64;

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

template <typename T>
int td_columns(const TDArgs& td, const ColumnArgs& col) {
  Engine<T> engine(td);
  if (!engine.inputs_finite()) return 1;
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
  auto* trace = static_cast<T*>(td.learner_trace);
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
            const T error = engine.delta[b * K + q], decay = engine.trace_decay[b];
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

// ------------------------------------------------------------------ dense LSTM, T-BPTT
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
  if (!engine.inputs_finite()) return 1;
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
  auto* trace = static_cast<T*>(td.learner_trace);  // [K, B, 4, n, m]
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
    const T decay = engine.trace_decay[b];
    add_window_gradient(trace + (q * B + b) * block, decay, adjoints, stride, lane, inputs.data(),
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
int td_columns_float32(const TDArgs* td, const ColumnArgs* col) { return td_columns<float>(*td, *col); }
int td_columns_float64(const TDArgs* td, const ColumnArgs* col) { return td_columns<double>(*td, *col); }
int td_window_float32(const TDArgs* td, const WindowArgs* win) { return td_window<float>(*td, *win); }
int td_window_float64(const TDArgs* td, const WindowArgs* win) { return td_window<double>(*td, *win); }
}
