// Attention forward (primal, or primal + tangent) for sm_90a, warp-specialised: the per-tile math
// of attention_fwd_sm90_kernel.cuh (issue_s_chain, softmax_scores, pack_operands, issue_pv_chain),
// with the loads moved to a producer warpgroup that issues TMA copies, and the CTA-wide barriers
// replaced by mbarriers, so the two consumer warpgroups are never realigned by a tile barrier.
//
// CTA = 3 warpgroups. Warpgroups 0, 1 (consumers, 240 registers each after setmaxnreg) own query
// rows 0..63 and 64..127 exactly as in the cp.async kernel; warpgroup 2 (producer, 24 registers)
// has one thread that issues every TMA load: Q (+ Q̇) once, then per key tile K (+ K̇) and V (+ V̇)
// into a kStages-deep ring. The TMA writes the 128-byte-swizzled panels the descriptors read
// (box = 64 columns × rows: one panel), and zero-fills rows past N and columns past the head dim.
//
// Per ring stage s three mbarriers: k_full[s] (K, K̇ landed: the S chain may start), v_full[s] (V,
// V̇ landed: the P·V chain may start), empty[s] (all 8 consumer warps are done with the stage: the
// producer may refill it). Stage s holds tiles s, s + kStages, ...; round r = tile / kStages waits
// on the phase of parity r & 1 (full barriers), the producer on r − 1 (empty barriers).
//
// Warpgroup order (ping-pong): named barriers 1 (WG0's turn) and 2 (WG1's turn), 256 threads each.
// Before its S chain a warpgroup waits for its turn; after issuing it, it hands the turn to the
// other. WG1 hands WG0 the first turn. So the S chains alternate WG0, WG1, WG0, ... and each
// warpgroup's softmax runs while the other's products are on the tensor cores.
//
// Bias tiles (kBias, d = 64 only): the CTA's fp32 [kBM][kBN] tile (× log2e) and bias_t tile after the
// mbarriers, laid out as in the cp.async kernel; each consumer warpgroup stages its own 64 rows per
// tile (stage_bias_tile over its 128 threads) while its S chain runs, then publishes them with a
// warpgroup-local named barrier (3 + wg); its turn barrier already keeps the previous tile's
// softmax ahead of the overwrite. At d = 128 the tiles do not fit next to the ring; the host sends
// those calls to the cp.async kernel.
#pragma once

#include "attention_fwd_sm90_kernel.cuh"
#include "tma.cuh"

namespace fastcm {
namespace attn {

// kOverlap: each warpgroup issues tile j's S chain, then tile j − 1's P·V chain, and runs tile j's
// softmax while the P·V chain is on the tensor cores (S, Ṡ of tile j and P, H of tile j − 1 live
// at once: not at d = 128 JVP, where they would pass the 240 registers).
//
// kQRegs (d = 64 only): each consumer thread loads its rows of Q (and Q̇) into registers once, as RS
// A fragments (16 registers per tile), and the S chains read only K, K̇ from shared memory. At
// m64n64k16 an SS wgmma reads 2 KB of A and 2 KB of B per 32 tensor-core cycles, the 128 B/cycle an
// SM's shared memory delivers (an estimate from the instruction shapes; FASTCM_ATTN_SM90_QREGS=0 and
// the benchmark's `_smemq` rows compare); at d = 128 the fragments (32, or 64 with Q̇) would pass the
// 240 registers.
template <typename T_, int kD_, bool kJvp_, bool kOverlap_, bool kQRegs_, bool kBias_>
struct FwdSm90WsTraits : FwdSm90Traits<T_, kD_, kJvp_, false> {
  using Base = FwdSm90Traits<T_, kD_, kJvp_, false>;
  static constexpr bool kOverlap = kOverlap_;
  static constexpr bool kQRegs = kQRegs_;
  static constexpr bool kBias = kBias_;
  static_assert(!kQRegs_ || kD_ == 64, "Q in registers only at d = 64");
  static_assert(!kBias_ || kD_ == 64, "bias tiles in the TMA kernel only at d = 64");
  static constexpr int kConsumerThreads = Base::kThreads;  // 2 warpgroups
  static constexpr int kConsumerWarps = kConsumerThreads / 32;
  static constexpr int kThreads = kConsumerThreads + 128;  // + the producer warpgroup
  // Stages: 3 (d = 64: 3 × 32 KB; d = 128 primal: 3 × 64 KB, 225 KB in all), 2 for d = 128 JVP,
  // whose 64 KB stages leave room for only two next to Q, Q̇. Three let the producer refill one
  // stage while the overlapped loop still holds the other two (tile j's S, tile j − 1's P·V).
  static constexpr int kStages = (kD_ == 128 && kJvp_) ? 2 : 3;
  static constexpr int kTileBytes = Base::kQTiles * Base::kQBytes + kStages * Base::kStageBytes;
  static constexpr int kBarriers = 1 + 3 * kStages;  // q_full, k_full[], v_full[], empty[]
  // + 1024: the dynamic shared-memory base is realigned to the 1024-byte swizzle period.
  static constexpr int kSmemBytes = kTileBytes + 8 * kBarriers + 1024;
  // 128·24 + 256·240 = 64512 of the 65536 registers; the launch gives each thread 168.
  static constexpr int kProducerRegs = 24, kConsumerRegs = 240;
  // setmaxnreg only moves registers within the CTA's launch allocation, so the launch must give
  // each thread at least this many (else the consumers' .inc waits forever).
  static constexpr int kLaunchRegs = (128 * kProducerRegs + kConsumerThreads * kConsumerRegs + kThreads - 1) / kThreads;
};

// The half of a CTA's bias tile one consumer warpgroup stages: its 64 rows over its 128 threads.
template <class Tr>
struct WgBiasRows {
  using T = typename Tr::T;
  static constexpr int kBM = 64, kBN = Tr::kBN, kThreads = 128;
};

// Dynamic shared memory of the warp-specialised kernel for padded head dim kd (64 or 128), with the
// bias tiles (0 bytes without); -1 where it takes no bias (kd = 128).
inline int fwd_sm90_ws_smem_bytes(int kd, bool jvp, bool has_bias, bool has_bias_t) {
  auto bytes = [&](auto tr) {
    using Tr = decltype(tr);
    return Tr::kSmemBytes + bias_smem_bytes<Tr>(has_bias, has_bias_t);
  };
  if (kd == 64) {
    return jvp ? bytes(FwdSm90WsTraits<__half, 64, true, false, false, true>{})
               : bytes(FwdSm90WsTraits<__half, 64, false, false, false, true>{});
  }
  if (has_bias || (jvp && has_bias_t)) return -1;
  return jvp ? FwdSm90WsTraits<__half, 128, true, false, false, false>::kSmemBytes
             : FwdSm90WsTraits<__half, 128, false, false, false, false>::kSmemBytes;
}

// The tensor maps the producer reads (built on the host by tma_map_4d; kernel parameters).
struct FwdTmaMaps {
  CUtensorMap q, k, v, q_t, k_t, v_t;
};

template <class Tr>
__global__ void __launch_bounds__(Tr::kThreads, 1)
    attention_fwd_sm90_ws_kernel(const FwdParams p, const __grid_constant__ FwdTmaMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = typename Tr::T;
  using namespace sm90;
  constexpr int kBM = Tr::kBM, kBN = Tr::kBN, kStages = Tr::kStages;
  constexpr bool kJvp = Tr::kJvp;
  constexpr int kTurnBarrier = 1;  // named barriers 1, 2: warpgroup 0's, 1's turn to issue its S chain
  constexpr int kBiasBarrier = 3;  // kBias: named barriers 3, 4: warpgroup 0's, 1's bias rows staged

  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = swizzle_aligned(smem_raw);
  const uint32_t sQ = smem_addr(smem);
  const uint32_t sQt = sQ + Tr::kQBytes;                // valid only if kJvp
  const uint32_t sKV = sQ + Tr::kQTiles * Tr::kQBytes;  // stage s: sKV + s·kStageBytes
  const uint32_t q_full = sQ + Tr::kTileBytes;
  auto k_full = [&](int s) { return q_full + 8 * (1 + s); };
  auto v_full = [&](int s) { return q_full + 8 * (1 + kStages + s); };
  auto empty = [&](int s) { return q_full + 8 * (1 + 2 * kStages + s); };

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int wg = __shfl_sync(0xffffffffu, warp / 4, 0);
  const FwdBlock<T> blk = fwd_block<T, kJvp, kBM, kBN>(p);
  const int n_tiles = blk.n_tiles;

  if (tid == 0) {
    mbar_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      mbar_init(k_full(s), 1);
      mbar_init(v_full(s), 1);
      mbar_init(empty(s), Tr::kConsumerWarps);
    }
    mbar_fence_init();
  }
  __syncthreads();

  if (wg == 2) {
    setmaxnreg_dec<Tr::kProducerRegs>();
    // n_tiles = 0 (rows that see no key) loads nothing: no copy may still be in flight at exit.
    if (warp == Tr::kConsumerWarps && lane == 0 && n_tiles > 0) {
      const int b = blk.b, h = blk.h, hkv = blk.h / (p.H / p.Hkv);
      mbar_arrive_expect_tx(q_full, Tr::kQTiles * Tr::kQBytes);
#pragma unroll
      for (int panel = 0; panel < Tr::kPanels; ++panel) {
        tma_load_4d(sQ + panel * kBM * 128, &maps.q, 64 * panel, blk.m0, h, b, q_full);
        if constexpr (kJvp) tma_load_4d(sQt + panel * kBM * 128, &maps.q_t, 64 * panel, blk.m0, h, b, q_full);
      }
      for (int tile = 0; tile < n_tiles; ++tile) {
        const int s = tile % kStages, n0 = tile * kBN;
        if (tile >= kStages) mbar_wait(empty(s), (tile / kStages - 1) & 1);
        const uint32_t stage = sKV + s * Tr::kStageBytes;
        mbar_arrive_expect_tx(k_full(s), (kJvp ? 2 : 1) * Tr::kKVBytes);
#pragma unroll
        for (int panel = 0; panel < Tr::kPanels; ++panel) {
          tma_load_4d(stage + panel * kBN * 128, &maps.k, 64 * panel, n0, hkv, b, k_full(s));
          if constexpr (kJvp)
            tma_load_4d(stage + Tr::kOffKt + panel * kBN * 128, &maps.k_t, 64 * panel, n0, hkv, b, k_full(s));
        }
        mbar_arrive_expect_tx(v_full(s), (kJvp ? 2 : 1) * Tr::kKVBytes);
#pragma unroll
        for (int panel = 0; panel < Tr::kPanels; ++panel) {
          tma_load_4d(stage + Tr::kOffV + panel * kBN * 128, &maps.v, 64 * panel, n0, hkv, b, v_full(s));
          if constexpr (kJvp)
            tma_load_4d(stage + Tr::kOffVt + panel * kBN * 128, &maps.v_t, 64 * panel, n0, hkv, b, v_full(s));
        }
      }
    }
    return;
  }

  setmaxnreg_inc<Tr::kConsumerRegs>();
  const int c = lane % 4;
  const int row_in_cta = 16 * warp + lane / 4;
  float acc_o[Tr::kNTileO][4];
  float acc_t[kJvp ? Tr::kNTileO : 1][4];
  zero_accumulators<kJvp>(acc_o, acc_t);
  float row_max[2] = {-INFINITY, -INFINITY};
  float row_sum[2] = {0.f, 0.f};
  float row_r[2] = {0.f, 0.f};
  // The bias tiles after the mbarriers (16-byte aligned: the vector staging's stores).
  static_assert(!Tr::kBias || (Tr::kTileBytes + 8 * Tr::kBarriers) % 16 == 0, "bias tiles 16-byte aligned");
  FwdBiasTiles bias = fwd_bias_tiles<Tr>(p, smem + Tr::kTileBytes + 8 * Tr::kBarriers, blk.b, blk.h);
  bias.has_bias = bias.has_bias && Tr::kBias;
  bias.has_bias_t = bias.has_bias_t && Tr::kBias;
  const uint32_t q_base = sQ + wg * 64 * 128, qt_base = sQt + wg * 64 * 128;
  // kQRegs: this thread's Q, Q̇ fragments (loaded once Q has landed, below). Zeroed first so that they
  // are defined on every path into the tile loop, not only under n_tiles > 0: defined only there, ptxas
  // (CUDA 13.0) gave two of the four Q̇ fragments' registers of the serial JVP kernel to the softmax's
  // temporaries inside the loop, so from the second key tile on Q̇·Kᵀ read garbage for those k-steps
  // (wrong tangents, right primal). scripts/check_sass_fragments.py checks the built SASS for it.
  uint32_t qa[Tr::kQRegs ? Tr::kD / 16 : 1][4] = {}, qta[Tr::kQRegs ? Tr::kD / 16 : 1][4] = {};

  // P, H packed for the next P·V chain (kOverlap: the previous tile's, issued after this tile's S).
  uint32_t pa[kBN / 16][4];
  uint32_t ha[kJvp ? kBN / 16 : 1][4];
  auto stage_of = [&](int tile) { return tile % kStages; };
  auto parity_of = [&](int tile) { return (uint32_t)((tile / kStages) & 1); };
  auto stage_base = [&](int tile) { return sKV + stage_of(tile) * Tr::kStageBytes; };
  // P·V of `tile`: waits for its V (+ V̇), issues the chain (the caller waits on it).
  auto issue_pv = [&](int tile) {
    mbar_wait_warp(v_full(stage_of(tile)), parity_of(tile));
    issue_pv_chain<Tr>(acc_o, acc_t, pa, ha, stage_base(tile));
  };
  auto retire_pv = [&](int tile) {
    fence_regs(acc_o);
    if constexpr (kJvp) fence_regs(acc_t);
    fence_regs(pa);
    if constexpr (kJvp) fence_regs(ha);
    if (lane == 0) mbar_arrive(empty(stage_of(tile)));  // this warp's reads of the stage are complete
  };

  // Wait for the tile's K (+ K̇), take this warpgroup's turn, issue its S chain.
  auto issue_s = [&](int tile, auto& sc, auto& sd) {
    fence_regs(sc);
    if constexpr (kJvp) fence_regs(sd);
    mbar_wait_warp(k_full(stage_of(tile)), parity_of(tile));
    named_barrier_sync(kTurnBarrier + wg, Tr::kConsumerThreads);
    if constexpr (Tr::kQRegs)
      issue_s_chain<Tr>(sc, sd, qa, qta, stage_base(tile));
    else
      issue_s_chain<Tr>(sc, sd, q_base, qt_base, stage_base(tile));
  };
  // The other warpgroup's turn; WG1's last turn goes to nobody (WG0 has no S chain left).
  auto hand_over = [&](int tile) {
    if (wg == 0 || tile + 1 < n_tiles) named_barrier_arrive(kTurnBarrier + 1 - wg, Tr::kConsumerThreads);
  };
  // kBias: this warpgroup's rows of the tile's bias (and bias_t), staged while its S chain runs. No
  // barrier before the overwrite: the turn barrier this warpgroup synced on before its S chain
  // completes only once all 128 of its threads have arrived, i.e. finished the previous softmax.
  auto stage_bias_rows = [&](int tile) {
    if constexpr (Tr::kBias) {
      using Rows = WgBiasRows<Tr>;
      const int m0 = blk.m0 + 64 * wg, n0 = tile * kBN, t = tid % 128;
      // Inlined: a call here, with this warpgroup's S (and P·V) chain in flight, would put the
      // accumulators' registers at the mercy of the callee's.
      // The staging mode is uniform over the call (FASTCM_ATTN_BIAS_STAGE; attention_fwd_kernel.cuh).
      if (p.bias_stage) {
        if (bias.has_bias)
          stage_bias_tile_vec<Rows>(bias.bias + 64 * wg * kBN, p.bias, bias.base, p.b_sm, p.b_sn, m0, n0, p.Nq, p.Nk,
                                    p.bias_is_f32, p.bias_mode & 4, 1.4426950408889634f, t);
        if (bias.has_bias_t)
          stage_bias_tile_vec<Rows>(bias.bias_t + 64 * wg * kBN, p.bias_t, bias.base_t, p.bt_sm, p.bt_sn, m0, n0, p.Nq,
                                    p.Nk, p.bias_t_is_f32, p.bias_t_mode & 4, 1.f, t);
      } else {
        if (bias.has_bias)
          stage_bias_tile<Rows>(bias.bias + 64 * wg * kBN, p.bias, bias.base, p.b_sm, p.b_sn, m0, n0, p.Nq, p.Nk,
                                p.bias_is_f32, 1.4426950408889634f, t);
        if (bias.has_bias_t)
          stage_bias_tile<Rows>(bias.bias_t + 64 * wg * kBN, p.bias_t, bias.base_t, p.bt_sm, p.bt_sn, m0, n0, p.Nq,
                                p.Nk, p.bias_t_is_f32, 1.f, t);
      }
      named_barrier_sync(kBiasBarrier + wg, 128);  // published to the warpgroup
    }
  };
  auto softmax = [&](int tile, auto& sc, auto& sd, float (&alpha)[2]) {
    fence_regs(sc);
    if constexpr (kJvp) fence_regs(sd);
    softmax_scores<Tr>(sc, sd, row_max, row_sum, row_r, alpha, p, bias, row_in_cta, blk.m0, tile * kBN, blk.off, c);
  };

  if (n_tiles > 0) {
    if (wg == 1) named_barrier_arrive(kTurnBarrier, Tr::kConsumerThreads);  // WG0 issues first
    mbar_wait_warp(q_full, 0);
    if constexpr (Tr::kQRegs) {
      load_a_fragments<kBM>(qa, q_base, warp % 4, lane);
      if constexpr (kJvp) load_a_fragments<kBM>(qta, qt_base, warp % 4, lane);
    }
  }
  if constexpr (Tr::kOverlap) {
    // Tile 0 has no P·V before it and the last P·V none after it: peeled, so that every wait in the
    // loop retires a known chain (ptxas serialises the wgmmas when a branch hides which). A, T are
    // rescaled by the previous tile's α while this tile's S chain runs, just before that tile's P·V.
    float alpha_prev[2];
    if (n_tiles > 0) {
      float sc[Tr::kNTileS][4], sd[kJvp ? Tr::kNTileS : 1][4];
      issue_s(0, sc, sd);
      hand_over(0);
      stage_bias_rows(0);
      wgmma_wait<0>();
      softmax(0, sc, sd, alpha_prev);
      pack_operands<Tr>(sc, sd, pa, ha);
    }
    for (int tile = 1; tile < n_tiles; ++tile) {
      float sc[Tr::kNTileS][4], sd[kJvp ? Tr::kNTileS : 1][4];
      issue_s(tile, sc, sd);
      rescale_accumulators<kJvp>(acc_o, acc_t, alpha_prev);
      issue_pv(tile - 1);  // runs under this tile's softmax
      hand_over(tile);
      stage_bias_rows(tile);
      wgmma_wait<1>();  // the S chain, committed first, is complete
      softmax(tile, sc, sd, alpha_prev);
      wgmma_wait<0>();  // the fragments are free again
      retire_pv(tile - 1);
      pack_operands<Tr>(sc, sd, pa, ha);
    }
    if (n_tiles > 0) {
      rescale_accumulators<kJvp>(acc_o, acc_t, alpha_prev);
      issue_pv(n_tiles - 1);
      wgmma_wait<0>();
      retire_pv(n_tiles - 1);
    }
  } else {
    for (int tile = 0; tile < n_tiles; ++tile) {
      float sc[Tr::kNTileS][4], sd[kJvp ? Tr::kNTileS : 1][4], alpha[2];
      issue_s(tile, sc, sd);
      hand_over(tile);
      stage_bias_rows(tile);
      wgmma_wait<0>();
      softmax(tile, sc, sd, alpha);
      rescale_accumulators<kJvp>(acc_o, acc_t, alpha);
      pack_operands<Tr>(sc, sd, pa, ha);
      issue_pv(tile);
      wgmma_wait<0>();
      retire_pv(tile);
    }
  }

  write_outputs<T, kJvp>(p, acc_o, acc_t, row_max, row_sum, row_r, blk.m0 + row_in_cta, blk.bh, blk.b, blk.h, c);
#else
  __trap();  // launched only on sm_90 devices, from a build with sm_90a code (FASTCM_WITH_SM90A)
#endif
}

}  // namespace attn
}  // namespace fastcm
