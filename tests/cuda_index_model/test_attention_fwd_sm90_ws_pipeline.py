"""The synchronisation of the warp-specialised sm_90a forward (csrc/cuda/attention_fwd_sm90_ws_kernel.cuh),
run under random schedules without a GPU.

The kernel's producer thread and its 8 consumer warps are transcribed as step-by-step scripts (their
mbarrier waits with the kernel's parity expressions, arrivals, TMA issues, named-barrier turns and
the shared-memory stages each step reads); the hardware side is modelled from the PTX ISA:
mbarriers (arrival count, transaction bytes, a phase bit that try_wait.parity compares against),
named barriers (bar.sync / bar.arrive over a thread count), and TMA copies that land at any later
step. A scheduler interleaves them at random. Checked on every schedule: no deadlock; a consumer
reads a stage only when it holds the tile it expects, and every wait passes on exactly the phase
it means (no parity aliasing); no copy overwrites a stage a consumer still reads; S chains are
issued in turns, WG0 tile j, WG1 tile j, WG0 tile j + 1, ...; at exit no copy is in flight and no
named barrier holds stray arrivals. What it cannot check: the memory model beyond these orders,
and the compiler.
"""

import random

import pytest

CONSUMER_WARPS, WARP = 8, 32
TURN_BARRIER = 1  # named barriers 1, 2: warpgroup 0's, 1's turn
BIAS_BARRIER = 3  # kBias: named barriers 3, 4: warpgroup 0's, 1's bias rows


class MBarrier:
    def __init__(self, count):
        self.count, self.pending, self.tx, self.completed = count, count, 0, 0

    def _maybe_complete(self):
        if self.pending == 0 and self.tx == 0:
            self.completed += 1
            self.pending = self.count

    def arrive(self, expect_tx=0):
        assert self.pending > 0, "arrival on a phase with none pending"
        self.tx += expect_tx
        self.pending -= 1
        self._maybe_complete()

    def complete_tx(self, nbytes):
        self.tx -= nbytes
        self._maybe_complete()

    def passes(self, parity):
        """try_wait.parity: true once the phase of this parity has completed (current phase differs)."""
        return self.completed % 2 != parity


class NamedBarrier:
    def __init__(self):
        self.arrived, self.generation = 0, 0

    def arrive(self, count):
        self.arrived += WARP
        assert self.arrived <= count, "more arrivals than the barrier's thread count"
        if self.arrived == count:
            self.arrived, self.generation = 0, self.generation + 1


class Kernel:
    """One CTA: barriers, the ring's contents, and the checks."""

    def __init__(self, n_tiles, stages, kv_bytes, jvp):
        self.n_tiles, self.stages = n_tiles, stages
        self.q_full = MBarrier(1)
        self.k_full = [MBarrier(1) for _ in range(stages)]
        self.v_full = [MBarrier(1) for _ in range(stages)]
        self.empty = [MBarrier(CONSUMER_WARPS) for _ in range(stages)]
        self.named = {b: NamedBarrier() for b in (TURN_BARRIER, TURN_BARRIER + 1, BIAS_BARRIER, BIAS_BARRIER + 1)}
        self.bias_parts = [{}, {}]  # per warpgroup: warp -> tile whose bias rows that warp staged last
        self.bias_reading = [set(), set()]  # per warpgroup: warps whose softmax reads the rows now
        self.tile_bytes = (2 if jvp else 1) * kv_bytes
        self.slot = {}  # (stage, "k" | "v" | "q") -> tile whose copy landed
        self.readers = {}  # stage -> {warp: tile} of the warps whose wgmma may still read it
        self.in_flight = []  # TMA copies: (slot, tile, barrier, bytes)
        self.s_issues = []  # (warpgroup, tile) per warp, in issue order

    def tma(self, slot, tile, barrier, nbytes):
        self.in_flight.append((slot, tile, barrier, nbytes))

    def land(self, i):
        slot, tile, barrier, nbytes = self.in_flight.pop(i)
        if slot[0] != "q":
            held = self.readers.get(slot[0], {})
            assert all(t == tile for t in held.values()), (
                f"copy of tile {tile} overwrites stage {slot[0]} while tiles {held} are read from it"
            )
        self.slot[slot] = tile
        barrier.complete_tx(nbytes)


def wait(bar, parity, phase):
    """A waiting step: passes when try_wait.parity would; then it must be the phase meant."""

    def step():
        if not bar.passes(parity):
            return False
        assert bar.completed == phase + 1, f"wait meant phase {phase}, barrier has completed {bar.completed}"
        return True

    return step


def producer(kc, stages):
    """The producer thread (warp 8, lane 0) of attention_fwd_sm90_ws_kernel."""
    if kc.n_tiles == 0:
        return
    kc.q_full.arrive(expect_tx=1)
    kc.tma(("q",), 0, kc.q_full, 1)
    yield None
    for tile in range(kc.n_tiles):
        s = tile % stages
        if tile >= stages:
            yield wait(kc.empty[s], (tile // stages - 1) & 1, tile // stages - 1)
        kc.k_full[s].arrive(expect_tx=kc.tile_bytes)
        for _ in range(kc.tile_bytes // 4096):
            kc.tma((s, "k"), tile, kc.k_full[s], 4096)
            yield None
        kc.v_full[s].arrive(expect_tx=kc.tile_bytes)
        for _ in range(kc.tile_bytes // 4096):
            kc.tma((s, "v"), tile, kc.v_full[s], 4096)
            yield None


def named_sync(kc, bar_id, count):
    """bar.sync: this warp arrives, then waits for the barrier's phase to complete."""
    bar = kc.named[bar_id]
    generation = bar.generation
    bar.arrive(count)
    yield lambda: bar.generation > generation


def consumer(kc, warp, stages, overlap, bias):
    """Consumer warp `warp` (warpgroup warp // 4) of attention_fwd_sm90_ws_kernel; overlap: the
    kOverlap loop (tile 0 peeled; tile j's S chain, then tile j − 1's P·V chain, in one turn); bias:
    kBias (each warpgroup stages its bias rows after its S chain and publishes them on its named
    barrier; then its softmax reads them)."""
    wg = warp // 4
    threads = CONSUMER_WARPS * WARP

    def stage_bias_rows(tile):
        if not bias:
            return
        # No barrier before the overwrite: issue_s's turn barrier completes only with all four warps
        # of this warpgroup in, past their previous softmax.
        assert not kc.bias_reading[wg], f"warp {warp} overwrites bias rows its warpgroup's softmax still reads"
        kc.bias_parts[wg][warp] = tile
        yield None
        yield from named_sync(kc, BIAS_BARRIER + wg, 4 * WARP)

    def softmax(tile):
        """One step in which this warp's softmax reads its warpgroup's bias rows."""
        if bias:
            parts = [kc.bias_parts[wg].get(w) for w in range(4 * wg, 4 * wg + 4)]
            assert parts == [tile] * 4, f"warp {warp} softmax of tile {tile} reads bias rows of tiles {parts}"
            kc.bias_reading[wg].add(warp)
        yield None
        kc.bias_reading[wg].discard(warp)

    def issue_s(tile):
        s = tile % stages
        yield wait(kc.k_full[s], (tile // stages) & 1, tile // stages)
        yield from named_sync(kc, TURN_BARRIER + wg, threads)
        assert kc.slot[(s, "k")] == tile, (
            f"warp {warp} S chain of tile {tile} reads stage {s} holding {kc.slot[(s, 'k')]}"
        )
        kc.readers.setdefault(s, {})[warp] = tile
        kc.s_issues.append((wg, tile))

    def issue_pv(tile):
        s = tile % stages
        yield wait(kc.v_full[s], (tile // stages) & 1, tile // stages)
        assert kc.slot[(s, "v")] == tile, (
            f"warp {warp} P·V chain of tile {tile} reads stage {s} holding {kc.slot[(s, 'v')]}"
        )

    def hand_over(tile):
        if wg == 0 or tile + 1 < kc.n_tiles:
            kc.named[TURN_BARRIER + 1 - wg].arrive(threads)

    def retire_pv(tile):
        s = tile % stages
        del kc.readers[s][warp]
        kc.empty[s].arrive()

    if kc.n_tiles > 0:
        if wg == 1:
            kc.named[TURN_BARRIER].arrive(threads)
            yield None
        yield wait(kc.q_full, 0, 0)
        assert kc.slot[("q",)] == 0
    if overlap:
        for tile in range(kc.n_tiles):
            yield from issue_s(tile)
            if tile > 0:
                yield from issue_pv(tile - 1)
            hand_over(tile)
            yield from stage_bias_rows(tile)
            yield from softmax(tile)  # after wgmma_wait<1>
            if tile > 0:
                retire_pv(tile - 1)  # after wgmma_wait<0>
            yield None
        if kc.n_tiles > 0:
            yield from issue_pv(kc.n_tiles - 1)
            yield None
            retire_pv(kc.n_tiles - 1)
    else:
        for tile in range(kc.n_tiles):
            yield from issue_s(tile)
            hand_over(tile)
            yield from stage_bias_rows(tile)
            yield from softmax(tile)  # after wgmma_wait
            yield from issue_pv(tile)
            yield None  # wgmma_wait
            retire_pv(tile)
            yield None


def run_cta(n_tiles, stages, jvp, overlap, seed, bias=False, kv_bytes=8192):
    rng = random.Random(seed)
    kc = Kernel(n_tiles, stages, kv_bytes, jvp)
    agents = [producer(kc, stages)] + [consumer(kc, w, stages, overlap, bias) for w in range(CONSUMER_WARPS)]
    blocked = [None] * len(agents)  # a pending wait condition, or None
    done = [False] * len(agents)
    while not all(done):
        runnable = [i for i in range(len(agents)) if not done[i] and (blocked[i] is None or blocked[i]())]
        choices = [("agent", i) for i in runnable] + [("land", j) for j in range(len(kc.in_flight))]
        assert choices, f"deadlock: n_tiles {n_tiles}, stages {stages}, seed {seed}"
        kind, i = rng.choice(choices)
        if kind == "land":
            kc.land(i)
            continue
        try:
            blocked[i] = next(agents[i])
        except StopIteration:
            done[i] = True
    assert not kc.in_flight, "TMA copies still in flight at exit"
    assert all(b.arrived == 0 for b in kc.named.values()), "stray arrivals left on a named barrier"
    return kc


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("n_tiles", [0, 1, 2, 3, 4, 7])
@pytest.mark.parametrize("jvp", [False, True])
def test_pipeline_is_safe_under_random_schedules(n_tiles, stages, jvp, overlap):
    for seed in range(40):
        # kBias exists at d 64 only, where the ring has 3 stages.
        kc = run_cta(n_tiles, stages, jvp, overlap, seed, bias=stages == 3 and seed % 2 == 1)
        # S chains in turns: every warp of WG1 issues tile j after all of WG0's, and WG0's tile
        # j + 1 after all of WG1's tile j.
        order = [wg * 0.5 + tile for wg, tile in kc.s_issues]
        assert len(order) == CONSUMER_WARPS * n_tiles
        for a, b in zip(order, order[1:]):
            assert b >= a, f"S chains out of turn: {kc.s_issues}"
