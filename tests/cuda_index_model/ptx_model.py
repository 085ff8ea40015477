"""What both CUDA index models share: the PTX fragment models (ldmatrix.x4, mma.m16n8k16, an
accumulator reused as an A operand), the global-memory tensor view, the cp.async tile loader and
the bias staging, each a float64 transcription of the kernels' code (csrc/cuda/*.cuh)."""

import numpy as np

LOG2E = 1.4426950408889634
LANE = np.arange(32)
G_, C_ = LANE // 4, LANE % 4            # lane's group (row) and column pair in a fragment
ELEM = 2                                 # bytes per bf16/fp16 element


def ldmatrix_x4(smem, addr, trans=False):
    """addr[lane]: element offset of row lane%8 of matrix lane//8. Returns regs[lane, i, 0:2]."""
    assert np.all(addr % 8 == 0), "ldmatrix row addresses must be 16-byte aligned"
    regs = np.empty((32, 4, 2))
    for m in range(4):
        rows = addr[8 * m: 8 * m + 8]
        # One phase reads the 8 rows of one matrix: conflict-free iff they sit in 8 distinct
        # 16-byte bank groups (a 128-byte line of 32 banks holds 8 groups).
        assert len(set(((rows * ELEM) // 16) % 8)) == 8, "ldmatrix phase has a bank conflict"
        if not trans:   # lane L: row L/4, columns 2(L%4), 2(L%4)+1
            regs[:, m, 0] = smem[rows[G_] + 2 * C_]
            regs[:, m, 1] = smem[rows[G_] + 2 * C_ + 1]
        else:           # lane L: (row 2(L%4), col L/4) and (row 2(L%4)+1, col L/4)
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
            smem[dst:dst + 8] = src[base + r * stride + c * 8 + np.arange(8)] if ok else 0.0


def stage_bias(rows, cols, p, bias, base, m0, n0, mult):
    """The (rows × cols) bias tile at (m0, n0), times mult, 0 outside the (Nq, Nk) matrix."""
    idx = np.arange(rows * cols)          # every thread's idx loop at once
    r, cc = idx // cols, idx % cols
    i, j = m0 + r, n0 + cc
    ok = (i < p["Nq"]) & (j < p["Nk"])
    out = np.zeros(idx.size)
    out[ok] = mult * bias.s[base + i[ok] * bias.st[2] + j[ok] * bias.st[3]]
    return out
