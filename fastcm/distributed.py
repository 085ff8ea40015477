"""Context-parallel attention over a torch.distributed process group: ring attention, and all-to-all
(Ulysses-style) attention.

Rank r holds the r-th contiguous chunk of the sequence: q (B, H, Nq_r, Dqk), k (B, Hkv, Nk_r, Dqk),
v (B, Hkv, Nk_r, Dv). K/V (and their tangents) travel around the ring; each rank attends its
queries to every chunk and merges the partial results exactly with their LSE (and μ):
LSE = logsumexp_s LSE_s, w_s = exp(LSE_s − LSE), O = Σ w_s O_s, μ = Σ w_s μ_s,
Ȯ = Σ w_s (Ȯ_s + (μ_s − μ)·O_s). Works with gloo (CPU tensors) and NCCL (CUDA tensors).
"""

import torch
import torch.distributed as dist

from .attention import _check, _ops_for, attention, attention_jvp, merge_attention_partials


def _ring_setup(group, q, k, causal):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"fastcm.ring_attention: causal needs equal query and key chunks per rank, got "
            f"Nq = {q.shape[2]} and Nk = {k.shape[2]}"
        )
    return world, rank


def _rotate(tensors, group, world, rank):
    """Send `tensors` to rank + 1 and receive the same shapes from rank − 1."""
    received = [torch.empty_like(t) for t in tensors]

    def global_rank(group_rank):
        return group_rank if group is None else dist.get_global_rank(group, group_rank)

    send_to, recv_from = global_rank((rank + 1) % world), global_rank((rank - 1) % world)
    ops = [dist.P2POp(dist.isend, t, send_to, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, t, recv_from, group) for t in received]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def _chunk_mode(source, rank, causal):
    """'full', 'causal' (the diagonal chunk) or None (a later chunk, invisible under causal)."""
    if not causal or source < rank:
        return "full"
    return "causal" if source == rank else None


def _ring_forward(q, k, v, tangents, scale, causal, group):
    world, rank = _ring_setup(group, q, k, causal)
    blocks = [k, v] + (list(tangents[1:]) if tangents else [])
    outs, lses, out_ts, lse_ts = [], [], [], []
    for step in range(world):
        source = (rank - step) % world
        mode = _chunk_mode(source, rank, causal)
        if mode is not None:
            if tangents:
                o, o_t, lse, lse_t = attention_jvp(
                    q,
                    blocks[0],
                    blocks[1],
                    tangents[0],
                    blocks[2],
                    blocks[3],
                    scale=scale,
                    causal=mode == "causal",
                    return_lse=True,
                )
                out_ts.append(o_t)
                lse_ts.append(lse_t)
            else:
                o, lse = _ops_for(q, v).attention_forward(q, blocks[0], blocks[1], None, scale, mode == "causal")
            outs.append(o)
            lses.append(lse)
        if step < world - 1:
            blocks = _rotate(blocks, group, world, rank)
    if tangents:
        return merge_attention_partials(outs, lses, out_ts, lse_ts)
    return merge_attention_partials(outs, lses)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(q, k, v, scale, causal, group):
        return _ring_forward(q, k, v, None, scale, causal, group)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, scale, causal, group = inputs
        out, lse = output
        ctx.options = (scale, causal, group)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        # With the global LSE, each chunk's probabilities are exact: dQ sums over chunks, and
        # dK/dV accumulators travel with their K/V block and end one more hop later at the owner.
        q, k, v, out, lse = ctx.saved_tensors
        scale, causal, group = ctx.options
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        grad_out = grad_out.contiguous()
        grad_q = torch.zeros_like(q, dtype=lse.dtype)
        blocks = [k, v, torch.zeros_like(k, dtype=lse.dtype), torch.zeros_like(v, dtype=lse.dtype)]
        for step in range(world):
            mode = _chunk_mode((rank - step) % world, rank, causal)
            if mode is not None:
                dq, dk, dv = _ops_for(q, v).attention_backward(
                    grad_out, q, blocks[0], blocks[1], out, lse, None, scale, mode == "causal"
                )
                grad_q += dq
                blocks[2] += dk
                blocks[3] += dv
            if step < world - 1:
                blocks = _rotate(blocks, group, world, rank)
        grad_k, grad_v = _rotate(blocks[2:], group, world, rank) if world > 1 else blocks[2:]
        return grad_q.to(q.dtype), grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def ring_attention(q, k, v, *, scale=None, causal=False, group=None, return_lse=False):
    """Attention of this rank's queries to the keys of every rank in `group` (context parallel).

    q (B, H, Nq_r, Dqk), k (B, Hkv, Nk_r, Dqk), v (B, Hkv, Nk_r, Dv): this rank's chunk of a
    sequence split in rank order; all ranks pass the same B, H, Hkv, D and dtype. causal: the
    global causal mask, which needs Nq_r == Nk_r on every rank. No attn_bias. Returns O
    (B, H, Nq_r, Dv) [, LSE (B, H, Nq_r)], equal to fastcm.attention on the gathered sequence.
    Gradients flow to q, k, v (the backward passes dK/dV around the ring as well). For tangents
    use ring_attention_jvp.
    """
    _check(q, k, v, None, scale, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    q, k, v = (t.contiguous() for t in (q, k, v))
    out, lse = _RingAttention.apply(q, k, v, scale, causal, group)
    return (out, lse) if return_lse else out


def ring_attention_jvp(q, k, v, q_t, k_t, v_t, *, scale=None, causal=False, group=None, return_lse=False):
    """ring_attention and its tangent: K/V and K̇/V̇ travel together; each chunk's (O_s, Ȯ_s,
    LSE_s, μ_s) comes from one fused kernel call and the partials are merged with LSE and μ.
    Returns (O, Ȯ) or (O, Ȯ, LSE, μ); no autograd graph."""
    _check(q, k, v, None, scale, causal)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = [t.contiguous() for t in (q, k, v, q_t, k_t, v_t)]
    with torch.no_grad():
        out, out_t, lse, lse_t = _ring_forward(*tensors[:3], tensors[3:], scale, causal, group)
    return (out, out_t, lse, lse_t) if return_lse else (out, out_t)


def _all_to_all(x, group, world, heads_to_scatter):
    """heads_to_scatter: (B, H, N_r, D) -> (B, H/P, N, D), this rank's head group over the whole
    sequence; else the inverse, (B, H/P, N, D) -> (B, H, N_r, D). all_to_all_single exchanges the
    leading dimension (gloo has no list all_to_all), so the P blocks are moved to the front first."""
    batch, heads, length, dim = x.shape
    if heads_to_scatter:
        blocks = x.reshape(batch, world, heads // world, length, dim).transpose(0, 1).contiguous()
    else:
        blocks = x.reshape(batch, heads, world, length // world, dim).permute(2, 0, 1, 3, 4).contiguous()
    received = torch.empty_like(blocks)
    dist.all_to_all_single(received, blocks, group=group)
    if heads_to_scatter:  # received[p]: the head group of this rank, sequence chunk of rank p
        return received.permute(1, 2, 0, 3, 4).reshape(batch, heads // world, world * length, dim)
    return received.transpose(0, 1).reshape(batch, world * heads, length // world, dim)


class _AllToAll(torch.autograd.Function):
    """The exchange as a linear map: its gradient is the inverse exchange, its tangent the same exchange."""

    @staticmethod
    def forward(x, group, world, heads_to_scatter):
        return _all_to_all(x, group, world, heads_to_scatter)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.group, ctx.world, ctx.heads_to_scatter = inputs

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.group, ctx.world, not ctx.heads_to_scatter), None, None, None

    @staticmethod
    def jvp(ctx, x_t, *_):
        return _all_to_all(x_t.contiguous(), ctx.group, ctx.world, ctx.heads_to_scatter)


def _ulysses_setup(q, k, v, group):
    world = dist.get_world_size(group)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.shape[1] % world:
            raise ValueError(
                f"fastcm.ulysses_attention: {name} has {t.shape[1]} heads, which the {world} ranks of "
                f"the group cannot share; heads must be a multiple of the world size"
            )
    if q.shape[2] != k.shape[2]:
        raise ValueError(
            f"fastcm.ulysses_attention: self-attention only: q has {q.shape[2]} tokens per rank, k has {k.shape[2]}"
        )
    return world


def ulysses_attention(q, k, v, *, scale=None, causal=False, group=None):
    """Context-parallel self-attention by all-to-all (DeepSpeed-Ulysses, Jacobs et al. 2023).

    Rank r holds the r-th contiguous sequence chunk: q (B, H, N_r, Dqk), k (B, Hkv, N_r, Dqk),
    v (B, Hkv, N_r, Dv), the same N_r on every rank. One all-to-all per tensor scatters the heads
    and gathers the sequence (each rank gets H/P heads over all N tokens), fastcm.attention runs on
    that, and one all-to-all sends the output back: O (B, H, N_r, Dv), equal to attention on the
    gathered sequence. H and Hkv must be multiples of the world size P; causal is the global mask.
    Gradients flow to q, k, v (the backward exchanges the gradients the inverse way), and
    torch.func.jvp / forward-AD tangents pass through (the exchanges carry the tangents, the
    attention's tangent is fastcm's fused kernel). Compared with ring attention: 4 all-to-alls of
    1/P of each tensor instead of P − 1 hops of K and V, but at most P = H ranks.
    """
    _check(q, k, v, None, scale, causal)
    world = _ulysses_setup(q, k, v, group)
    q, k, v = (_AllToAll.apply(t.contiguous(), group, world, True) for t in (q, k, v))
    out = attention(q, k, v, scale=scale, causal=causal)
    return _AllToAll.apply(out.contiguous(), group, world, False)


def ulysses_attention_jvp(q, k, v, q_t, k_t, v_t, *, scale=None, causal=False, group=None):
    """ulysses_attention and its tangent for code that propagates tangents by hand: the tangents take
    the same exchanges and one fastcm.attention_jvp call gives (O, Ȯ) on the gathered sequence.
    Returns (O, Ȯ), this rank's chunk of each; no autograd graph."""
    _check(q, k, v, None, scale, causal)
    world = _ulysses_setup(q, k, v, group)
    with torch.no_grad():
        gathered = [_all_to_all(t.contiguous(), group, world, True) for t in (q, k, v, q_t, k_t, v_t)]
        out, out_t = attention_jvp(*gathered, scale=scale, causal=causal)
        return tuple(_all_to_all(t.contiguous(), group, world, False) for t in (out, out_t))


__all__ = ["ring_attention", "ring_attention_jvp", "ulysses_attention", "ulysses_attention_jvp"]
