"""What both CUDA index models share: the PTX fragment models (ldmatrix.x4, mma.m16n8k16, an
accumulator reused as an A operand), the global-memory tensor view, the cp.async tile loader and
the bias staging, each a float64 transcription of the kernels' code (csrc/cuda/*.cuh)."""

import numpy as np

LOG2E = 1.4426950408889634
LANE = np.arange(32)
G_, C_ = LANE // 4, LANE % 4  # lane's group (row) and column pair in a fragment
ELEM = 2  # bytes per bf16/fp16 element


def ldmatrix_x4(smem, addr, trans=False):
    """addr[lane]: element offset of row lane%8 of matrix lane//8. Returns regs[lane, i, 0:2]."""
    assert np.all(addr % 8 == 0), "ldmatrix row addresses must be 16-byte aligned"
    regs = np.empty((32, 4, 2))
    for m in range(4):
        rows = addr[8 * m : 8 * m + 8]
        # One phase reads the 8 rows of one matrix: conflict-free iff they sit in 8 distinct
        # 16-byte bank groups (a 128-byte line of 32 banks holds 8 groups).
        assert len(set(((rows * ELEM) // 16) % 8)) == 8, "ldmatrix phase has a bank conflict"
        if not trans:  # lane L: row L/4, columns 2(L%4), 2(L%4)+1
            regs[:, m, 0] = smem[rows[G_] + 2 * C_]
            regs[:, m, 1] = smem[rows[G_] + 2 * C_ + 1]
        else:  # lane L: (row 2(L%4), col L/4) and (row 2(L%4)+1, col L/4)
            regs[:, m, 0] = smem[rows[2 * C_] + G_]
            regs[:, m, 1] = smem[rows[2 * C_ + 1] + G_]
    return regs


def mma16816(d, a, b0, b1):
    """d[lane, 4] += A·B with the m16n8k16 fragment layouts of the kernel header's table."""
    A = np.zeros((16, 16))
    B = np.zeros((16, 8))
    for j in range(2):
        A[G_, 2 * C_ + j] = a[:, 0, j]
        A[G_ + 8, 2 * C_ + j] = a[:, 1, j]
        A[G_, 2 * C_ + 8 + j] = a[:, 2, j]
        A[G_ + 8, 2 * C_ + 8 + j] = a[:, 3, j]
        B[2 * C_ + j, G_] = b0[:, j]
        B[2 * C_ + 8 + j, G_] = b1[:, j]
    D = A @ B
    for j in range(2):
        d[:, j] += D[G_, 2 * C_ + j]
        d[:, 2 + j] += D[G_ + 8, 2 * C_ + j]


def pack_a(acc, kk):
    """Accumulator tiles 2kk, 2kk+1 as the A operand of keys 16kk..16kk+15 (no rounding: the
    models check indexing in float64)."""
    a = np.empty((32, 4, 2))
    for r, (t, e) in enumerate(((2 * kk, 0), (2 * kk, 2), (2 * kk + 1, 0), (2 * kk + 1, 2))):
        a[:, r, 0], a[:, r, 1] = acc[t][:, e], acc[t][:, e + 1]
    return a


def zeros_frags(n):
    return [np.zeros((32, 4)) for _ in range(n)]


class Tensor:
    """A global-memory tensor: flat storage + element strides (stride 0 allowed) + base offset."""

    def __init__(self, storage, strides, base=0):
        self.s, self.st, self.base = storage, strides, base


def contiguous(a):
    a = np.ascontiguousarray(a)
    return Tensor(a.reshape(-1), [s // a.itemsize for s in a.strides])


def load_tile(threads, smem, dst0, region_end, src, base, stride, rows, rows_valid, d_valid, kcols, krowlen):
    """The cp.async tile loader: rows × kcols elements in 16-byte chunks into smem rows of krowlen
    at dst0, zero-filled past rows_valid / d_valid; every write must stay inside [dst0, region_end)."""
    kchunks = kcols // 8
    kmap = 4 if kchunks <= 4 else 8 if kchunks <= 8 else 16 if kchunks <= 16 else 32
    kstep = threads // kmap
    assert threads % kmap == 0 and rows % kstep == 0, "tile loader layout"
    for tid in range(threads):
        c, r0 = tid % kmap, tid // kmap
        if kchunks != kmap and c >= kchunks:
            continue
        col_ok = c * 8 < d_valid
        for it in range(rows // kstep):
            r = r0 + it * kstep
            ok = col_ok and r < rows_valid
            dst = dst0 + r * krowlen + c * 8
            assert dst % 8 == 0 and dst + 8 <= region_end, "cp.async destination outside its tile"
            smem[dst : dst + 8] = src[base + r * stride + c * 8 + np.arange(8)] if ok else 0.0


def stage_bias(rows, cols, p, bias, base, m0, n0, mult):
    """The (rows × cols) bias tile at (m0, n0), times mult, 0 outside the (Nq, Nk) matrix."""
    idx = np.arange(rows * cols)  # every thread's idx loop at once
    r, cc = idx // cols, idx % cols
    i, j = m0 + r, n0 + cc
    ok = (i < p["Nq"]) & (j < p["Nk"])
    out = np.zeros(idx.size)
    out[ok] = mult * bias.s[base + i[ok] * bias.st[2] + j[ok] * bias.st[3]]
    return out


def bias_swizzle(cols, row):
    """bias_swizzle<kBN>(row): the vector staging's XOR on the columns of tile row `row`."""
    return (row & 3) * 8 & (cols - 1)


def bias_rows_vectorisable(shape, strides, storage_offset):
    """The host's bias_rows_vectorisable (attention_cuda.cu) on a (B, H, Nq, Nk) view: contiguous
    rows, 4-element aligned batch / head / row strides where the dimension has more than one entry,
    and the data pointer 4-element aligned (the storage itself is: the CUDA allocator's blocks are)."""
    aligned = all(shape[d] == 1 or strides[d] % 4 == 0 for d in range(3))
    return strides[3] == 1 and aligned and storage_offset % 4 == 0


def stage_bias_vector(threads, rows, cols, p, bias, base, m0, n0, mult, vec_ok):
    """stage_bias_tile_vec (the sm_90a kernels' vector staging), thread by thread: returns the shared
    tile (rows·cols floats, NaN where never written), the number of writes per float, and the loads:
    (kind, element offsets) with kind "vec" (one vector load of 4 consecutive elements) or "scalar"."""
    row_chunks = cols // 4
    tile = np.full(rows * cols, np.nan)
    writes = np.zeros(rows * cols, dtype=int)
    loads = []
    for tid in range(threads):
        for idx in range(tid, rows * row_chunks, threads):
            r, cc = idx // row_chunks, idx % row_chunks * 4
            i, j = m0 + r, n0 + cc
            v = np.zeros(4)
            if i < p["Nq"]:
                off = base + i * bias.st[2] + j * bias.st[3]
                if vec_ok and j + 3 < p["Nk"]:
                    assert bias.st[3] == 1, "a vector load of a non-contiguous row"
                    loads.append(("vec", off + np.arange(4)))
                    v = bias.s[off : off + 4].astype(float)
                else:
                    for k in range(4):
                        if j + k < p["Nk"]:
                            loads.append(("scalar", np.array([off + k * bias.st[3]])))
                            v[k] = bias.s[off + k * bias.st[3]]
            dst = r * cols + (cc ^ bias_swizzle(cols, r))
            assert dst % 4 == 0 and dst + 4 <= rows * cols, "float4 store outside its row chunk"
            tile[dst : dst + 4] = mult * v
            writes[dst : dst + 4] += 1
    return tile, writes, loads


def bias_read_pairs(kbn, row_in_cta, nt, c, half, vector):
    """scores_to_log2's bias_at<true>: the 8-byte read of keys (8nt + 2c, + 1), row row_in_cta + 8·half,
    its float index (vector: the bias_stage of FASTCM_ATTN_BIAS_STAGE=vector)."""
    x = bias_swizzle(kbn, row_in_cta) if vector else 0
    return (row_in_cta + 8 * half) * kbn + ((nt * 8 + 2 * c) ^ x)


# ---- wgmma (sm_90a; csrc/cuda/wgmma.cuh) ------------------------------------------------------
# Shared memory is modelled with absolute byte addresses: `SharedMemory` maps [base, base + size)
# onto an array of 16-bit elements. The hardware side (descriptor decoding, the canonical 128-byte
# swizzle layouts, the warpgroup fragment layouts) is written from the PTX ISA independently of the
# kernel's encoding, so a descriptor or loader the kernel gets wrong reads the wrong elements here.


class SharedMemory:
    def __init__(self, base, size):
        assert base % 16 == 0, "dynamic shared memory is 16-byte aligned"
        self.base, self.size = base, size
        self.e = np.full(size // ELEM, np.nan)  # stale shared memory is NaN

    def index(self, addr):
        addr = np.asarray(addr)
        assert (
            np.all(addr % ELEM == 0) and np.all(addr >= self.base) and np.all(addr + ELEM <= self.base + self.size)
        ), "shared-memory access outside the allocation"
        return (addr - self.base) // ELEM


def desc_sw128(addr, lbo, sbo):
    """The kernel's descriptor encoding (desc_sw128 in wgmma.cuh)."""
    return ((addr & 0x3FFFF) >> 4) | ((lbo >> 4) << 16) | ((sbo >> 4) << 32) | (1 << 62)


def _decode(desc):
    start, lbo, sbo = (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4
    assert desc >> 62 == 1, "128-byte swizzle mode"
    assert (desc >> 49) & 7 == 0, "base offset 0: the swizzle pattern starts at a 1024-byte boundary"
    return start, lbo, sbo


def swizzle128(addr):
    """128-byte swizzle on absolute addresses: 16-byte chunk bits [4, 7) ^= row bits [7, 10)."""
    return addr ^ (((addr >> 7) & 7) << 4)


def kmajor_operand(sm, desc, rows):
    """rows × 16 operand, K contiguous: element (i, k) at start + (i%8)·128 + (i//8)·SBO + 2k."""
    start, _, sbo = _decode(desc)
    assert start % 128 + 32 <= 128, "a k16 step stays inside one 128-byte swizzle row"
    i, k = np.arange(rows)[:, None], np.arange(16)[None, :]
    return sm.e[sm.index(swizzle128(start + (i % 8) * 128 + (i // 8) * sbo + ELEM * k))]


def mnmajor_operand(sm, desc, cols):
    """16 × cols operand (K rows, M/N contiguous): element (k, j) at start + 2·(j%64) + (j//64)·LBO +
    (k%8)·128 + (k//8)·SBO."""
    start, lbo, sbo = _decode(desc)
    k, j = np.arange(16)[:, None], np.arange(cols)[None, :]
    return sm.e[sm.index(swizzle128(start + ELEM * (j % 64) + (j // 64) * lbo + (k % 8) * 128 + (k // 8) * sbo))]


def _scatter_acc(d, D, accumulate):
    """D (64 × N) into the warpgroup accumulators d[warp][j] (32 × 4): warp w holds rows 16w..16w+15,
    per n8 block j the m16n8 C layout."""
    for w in range(4):
        for j in range(len(d[w])):
            for e in range(4):
                v = D[16 * w + G_ + 8 * (e // 2), 8 * j + 2 * C_ + e % 2]
                d[w][j][:, e] = d[w][j][:, e] + v if accumulate else v


def wgmma_ss(sm, d, desc_a, desc_b, scale_d):
    """D (+)= A·Bᵀ: A 64 × 16 and B N × 16, both K-major (m64nNk16, no transpose)."""
    n = 8 * len(d[0])
    D = kmajor_operand(sm, desc_a, 64) @ kmajor_operand(sm, desc_b, n).T
    _scatter_acc(d, D, bool(scale_d))


def wgmma_rs(sm, d, a, desc_b, b_mn_major=True, scale_d=1):
    """D (+)= A·B: A 64 × 16 from the warps' m16k16 A fragments a[warp] (32, 4, 2); B 16 × N, MN-major
    (imm-trans-b = 1) or K-major (stored N × 16, as in wgmma_ss)."""
    n = 8 * len(d[0])
    A = np.zeros((64, 16))
    for w in range(4):
        for j in range(2):
            A[16 * w + G_, 2 * C_ + j] = a[w][:, 0, j]
            A[16 * w + G_ + 8, 2 * C_ + j] = a[w][:, 1, j]
            A[16 * w + G_, 2 * C_ + 8 + j] = a[w][:, 2, j]
            A[16 * w + G_ + 8, 2 * C_ + 8 + j] = a[w][:, 3, j]
    B = mnmajor_operand(sm, desc_b, n) if b_mn_major else kmajor_operand(sm, desc_b, n).T
    _scatter_acc(d, A @ B, bool(scale_d))


# ---- TMA (cp.async.bulk.tensor, tiled mode, 128-byte swizzle; csrc/cuda/tma.cuh) -------------
# From the CUDA driver API's cuTensorMapEncodeTiled requirements and the PTX ISA's tensor copy:
# a box of box[0] × box[1] × ... elements at coordinates c (innermost first) lands in shared memory
# row-major (box[0] elements per row), swizzled like every other 128-byte-swizzle tile; elements
# outside the tensor's dims are written as zeros and count towards the transaction bytes.


class TensorMap:
    """A 4-D tiled tensor map: storage, base element offset, dims and byte strides (dims 1..3) as
    the host encodes them, with the encoder's checks."""

    def __init__(self, storage, base, dims, byte_strides, box):
        assert (base * ELEM) % 16 == 0, "global address 16-byte aligned"
        assert all(0 < d <= 2**32 for d in dims), "dims in (0, 2^32]"
        assert all(s > 0 and s % 16 == 0 and s < 2**40 for s in byte_strides), "strides: positive multiples of 16 B"
        assert all(0 < b <= 256 for b in box) and box[0] * ELEM <= 128 and (box[0] * ELEM) % 16 == 0, (
            "box: inner extent within the 128-byte swizzle span"
        )
        self.s, self.base, self.dims, self.box = storage, base, dims, box
        self.st = [1] + [s // ELEM for s in byte_strides]


def tma_load(sm, dst, tmap, coords):
    """One tiled load into shared memory at dst; returns the bytes it completes on its barrier."""
    assert dst % 128 == 0, "TMA destination 128-byte aligned"
    b0, b1 = tmap.box[0], tmap.box[1]
    assert tmap.box[2] == tmap.box[3] == 1
    r, c = np.arange(b1)[:, None], np.arange(b0)[None, :]
    g = [coords[0] + c, coords[1] + r, np.full_like(r, coords[2]), np.full_like(r, coords[3])]
    inside = np.ones((b1, b0), dtype=bool)
    offset = np.full((b1, b0), tmap.base)
    for axis in range(4):
        inside &= (g[axis] >= 0) & (g[axis] < tmap.dims[axis])
        offset = offset + np.where(inside, g[axis], 0) * tmap.st[axis]
    values = np.where(inside, tmap.s[np.where(inside, offset, 0)], 0.0)
    sm.e[sm.index(swizzle128(dst + (r * b0 + c) * ELEM))] = values
    return b0 * b1 * ELEM
