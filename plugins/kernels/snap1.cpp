// The fused TD step of SnAp-1 (plugins/snap1.py).

#include "dense.h"

namespace {

// ------------------------------------------------------------------ SnAp-1
// plugins/snap1.py: the dense LSTM with its recurrent weights masked by M, and per unit the
// sensitivities of its own state to its own weights, S^h and S^c: [B, 4, n, m].
template <typename T>
int td_snap1(const TDArgs& td, const SnapArgs& snap) {
  Engine<T> engine(td);
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
  T* trace = engine.learner_trace();  // [K, B, 4, n, m]
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
        for (index q = 0; q < K; ++q) {
          const T error = engine.delta[b * K + q], decay = engine.decay(b, q);
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
int td_snap1_float32(const TDArgs* td, const SnapArgs* args) { return td_snap1<float>(*td, *args); }
int td_snap1_float64(const TDArgs* td, const SnapArgs* args) { return td_snap1<double>(*td, *args); }
}
