"""The forward's two bias staging modes (FASTCM_ATTN_BIAS_STAGE; csrc/cuda/attention_fwd_kernel.cuh:
stage_bias_tile, stage_bias_tile_vec, scores_to_log2's reads), transcribed thread by thread
(ptx_model.stage_bias_vector) and checked on CPU: every element of the tile staged once, in its
swizzled place, 0 past the (Nq, Nk) tails; vector loads only where the host's rule allows them
(contiguous rows, aligned 4-element chunks, inside the matrix); the readers' swizzled 8-byte reads
give the scalar staging's values; and the bank pattern of those reads (conflict-free in the vector
mode, 4-way in the scalar one) and of the staging's 16-byte stores.

The tile shapes are those of the kernels with the vector mode: (rows, keys, threads) of the sm_90a
cp.async kernel (128 rows, 256 threads; 64 or 128 keys) and a consumer warpgroup's half of the TMA
kernel's tile (64 rows, 128 threads, 64 keys). (The sm_80 kernel stages scalar in both modes.)
"""

import numpy as np
import pytest
from ptx_model import (
    LOG2E,
    Tensor,
    bias_read_pairs,
    bias_rows_vectorisable,
    bias_swizzle,
    stage_bias,
    stage_bias_vector,
)

TILES = [(128, 64, 256), (128, 128, 256), (64, 64, 128)]


def bias_view(kind, B, H, Nq, Nk, rng):
    """A (B, H, Nq, Nk) bias as storage + strides + offset, as the host passes it."""
    if kind == "contiguous":
        strides, offset = [H * Nq * Nk, Nq * Nk, Nk, 1], 0
    elif kind == "broadcast":  # a (1, 1, Nq, Nk) tensor expanded over B, H
        strides, offset = [0, 0, Nk, 1], 0
    elif kind == "padded_rows":  # rows a multiple of 4 apart, past Nk: aligned
        row = (Nk + 3) // 4 * 4 + 4
        strides, offset = [H * Nq * row, Nq * row, row, 1], 0
    elif kind == "odd_rows":  # rows an odd number apart: misaligned chunks
        row = (Nk + 3) // 4 * 4 + 3
        strides, offset = [H * Nq * row, Nq * row, row, 1], 0
    elif kind == "offset":  # a view starting 2 elements into its storage
        strides, offset = [H * Nq * Nk, Nq * Nk, Nk, 1], 2
    else:  # "transposed": keys strided
        strides, offset = [H * Nq * Nk, Nq * Nk, 1, Nq], 0
    size = offset + sum((n - 1) * s for n, s in zip((B, H, Nq, Nk), strides)) + 1
    storage = rng.standard_normal(size)
    return Tensor(storage, strides, offset), strides, offset


@pytest.mark.parametrize("rows,cols,threads", TILES)
@pytest.mark.parametrize("kind", ["contiguous", "broadcast", "padded_rows", "odd_rows", "offset", "transposed"])
def test_vector_staging_places_every_element_once(rows, cols, threads, kind):
    rng = np.random.default_rng(rows + cols + len(kind))
    B, H = 2, 3
    # Tails in both dimensions; Nk % 4 != 0 (a chunk across the end of the row: loaded by element).
    for Nq, Nk in [(rows + 5, 2 * cols + 4), (rows - 7, cols - 1), (2 * rows, 2 * cols), (rows + 1, cols + 7)]:
        bias, strides, offset = bias_view(kind, B, H, Nq, Nk, rng)
        shape = (B, H, Nq, Nk)
        vec_ok = bias_rows_vectorisable(shape, strides, offset)
        assert vec_ok == (kind == "padded_rows" or (kind in ("contiguous", "broadcast") and Nk % 4 == 0))
        p = {"Nq": Nq, "Nk": Nk}
        b, h = B - 1, H - 1
        base = offset + b * strides[0] + h * strides[1]
        for m0 in sorted({0, (Nq - 1) // rows * rows}):  # the first tile and the tail's
            for n0 in sorted({0, (Nk - 1) // cols * cols}):
                tile, writes, loads = stage_bias_vector(threads, rows, cols, p, bias, base, m0, n0, LOG2E, vec_ok)
                assert np.all(writes == 1), "an element staged twice or never"
                want = stage_bias(rows, cols, p, bias, base, m0, n0, LOG2E)  # the scalar staging's tile
                r = np.arange(rows * cols) // cols
                cc = np.arange(rows * cols) % cols
                unswizzled = tile[r * cols + (cc ^ np.array([bias_swizzle(cols, x) for x in r]))]
                np.testing.assert_array_equal(unswizzled, want)
                for load_kind, offs in loads:
                    i = (offs - base) // strides[2] if strides[2] else None
                    assert np.all(offs >= 0) and np.all(offs < bias.s.size), "a load outside the bias"
                    if load_kind == "vec":
                        assert vec_ok and offs[0] % 4 == 0, "a misaligned vector load"
                        if strides[2]:
                            j = offs - base - i * strides[2]
                            assert np.all(i < Nq) and np.all(j < Nk), "a vector load past the tail"
                n_vec = sum(k == "vec" for k, _ in loads)
                if not vec_ok:
                    assert n_vec == 0
                else:  # every chunk inside the matrix is one vector load
                    inside = min(rows, Nq - m0) * (max(0, min(cols, Nk - n0)) // 4)
                    assert n_vec == inside, "a chunk inside the matrix not loaded as a vector"


def _half_warp_conflicts(float_index):
    """Largest number of distinct 8-byte words a half-warp's 64-bit shared loads put on one bank pair."""
    worst = 1
    for half in (float_index[:16], float_index[16:]):
        words = set(int(f) // 2 for f in half)
        pairs = [w % 16 for w in words]
        worst = max(worst, max(pairs.count(x) for x in set(pairs)))
    return worst


@pytest.mark.parametrize("rows,cols,threads", TILES)
def test_reads_see_the_staged_values_and_their_banks(rows, cols, threads):
    """The sm_90a kernels' 8-byte reads (bias_at<true>) of the swizzled tile and of the row-major one."""
    rng = np.random.default_rng(7)
    Nq, Nk = rows, cols
    bias, strides, offset = bias_view("contiguous", 1, 1, Nq, Nk, rng)
    p = {"Nq": Nq, "Nk": Nk}
    scalar = stage_bias(rows, cols, p, bias, 0, 0, 0, 1.0)
    vector, _, _ = stage_bias_vector(threads, rows, cols, p, bias, 0, 0, 0, 1.0, True)
    lane = np.arange(32)
    worst = {True: 1, False: 1}
    for warp in range(rows // 16):
        row_in_cta = 16 * warp + lane // 4  # the accumulator layout's rows (sm_80 and wgmma alike)
        c = lane % 4
        for nt in range(cols // 8):
            for half in (0, 1):
                ri = row_in_cta + 8 * half
                for is_vector, tile in ((True, vector), (False, scalar)):
                    pair = np.array([bias_read_pairs(cols, row_in_cta[x], nt, c[x], half, is_vector) for x in lane])
                    assert np.all(pair % 2 == 0), "an 8-byte read at an odd float"
                    for e in (0, 1):
                        np.testing.assert_array_equal(tile[pair + e], scalar[ri * cols + nt * 8 + 2 * c + e])
                    worst[is_vector] = max(worst[is_vector], _half_warp_conflicts(pair))
    assert worst[True] == 1, "the vector layout's reads have bank conflicts"
    assert worst[False] == 4, "the scalar layout's reads: 4 rows on each bank pair"


@pytest.mark.parametrize("rows,cols,threads", TILES)
def test_vector_staging_stores_are_conflict_free(rows, cols, threads):
    """A 16-byte store of 8 consecutive threads is one 128-byte phase: 8 distinct 16-byte bank groups."""
    row_chunks = cols // 4
    for first in range(0, threads, 8):
        for it in range(rows * row_chunks // threads):
            idx = np.arange(first, first + 8) + it * threads
            r, cc = idx // row_chunks, idx % row_chunks * 4
            dst = r * cols + (cc ^ np.array([bias_swizzle(cols, x) for x in r]))
            assert len(set((dst * 4 // 16) % 8)) == 8
