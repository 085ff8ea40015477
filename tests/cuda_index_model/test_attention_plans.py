"""The CUDA build's kernel choice against the index models' plans: plan_forward_launch and
plan_backward_for of csrc/cuda/attention_cuda.cu, which CUDA builds expose without a device as
torch.ops.fastcm.plan_attention_forward / plan_attention_backward, over every padded head-dim pair,
bias combination, switch setting and device limit the models know. A CPU-only build has no such
ops; scripts/check_cuda_build.sh (run by CI) builds the CUDA part and runs this file."""

import pytest
import torch
from test_attention_bwd_sm90_index_model import SMEM_OPTIN_SM80, plan_backward
from test_attention_fwd_sm90_index_model import SMEM_OPTIN_SM90, plan_forward_launch

from fastcm._extension import extension_ops

extension_ops()
pytestmark = pytest.mark.skipif(
    not hasattr(torch.ops.fastcm, "plan_attention_forward"),
    reason="fastcm._C built without its CUDA part (scripts/check_cuda_build.sh builds it)",
)
SMEM_OPTIN_SM86 = 99 * 1024


@pytest.mark.parametrize("sm90_smem_limit", [SMEM_OPTIN_SM90, 0])
def test_forward_plan_matches_the_model(sm90_smem_limit):
    plan = torch.ops.fastcm.plan_attention_forward
    for dqk8 in range(8, 257, 8):
        for cols in range(8, 129, 8):
            for jvp, has_bias, has_bias_t in [
                (j, b, t) for j in (False, True) for b in (False, True) for t in (False, True)
            ]:
                for tma_ok, overlap, q_regs in [
                    (t, o, r) for t in (False, True) for o in (False, True) for r in (False, True)
                ]:
                    name, kdqk, kdv = plan_forward_launch(
                        sm90_smem_limit, tma_ok, overlap, q_regs, dqk8, cols, jvp, has_bias, has_bias_t
                    )
                    got = plan(sm90_smem_limit, tma_ok, overlap, q_regs, dqk8, cols, jvp, has_bias, has_bias_t)
                    assert got == f"{name} ({kdqk}, {kdv})", (
                        dqk8,
                        cols,
                        jvp,
                        has_bias,
                        has_bias_t,
                        tma_ok,
                        overlap,
                        q_regs,
                    )


@pytest.mark.parametrize(
    "limits",
    [(SMEM_OPTIN_SM90, SMEM_OPTIN_SM90), (0, SMEM_OPTIN_SM80), (0, SMEM_OPTIN_SM86)],
    ids=["sm90", "sm80", "sm86"],
)
def test_backward_plan_matches_the_model(limits):
    sm90_limit, smem_limit = limits
    plan = torch.ops.fastcm.plan_attention_backward
    for dqk in range(1, 265, 7):
        for dv in range(1, 265, 9):
            for has_bias in (False, True):
                for sm90_on in (False, True):
                    kernel, kd = plan_backward(sm90_limit, sm90_on, dqk, dv, has_bias, smem_limit)
                    got = plan(sm90_on, sm90_limit, smem_limit, dqk, dv, has_bias)
                    assert got == ("aten" if kd == 0 else f"{kernel} ({kd})"), (dqk, dv, has_bias, sm90_on)
