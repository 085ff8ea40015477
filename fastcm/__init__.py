"""fastcm: fused kernels for consistency-model training and sampling.

Importing fastcm imports triton (where installed) to register the kernels as torch.library
ops, so set TRITON_INTERPRET=1 before `import fastcm` to run them on CPU tensors. The compiled
extension (attention) loads on first use.
"""

from . import blocks, ema, embeddings, flow_steps, sampling, schedules, sde_steps, testing, training, vp_steps
from .attention import attention, attention_jvp, merge_attention_partials
from .dmd import denoising_loss, dmd_loss
from .flow import add_noise, convert_prediction, convert_time, flow_map, flow_map_loss
from .losses import meanflow_loss, pseudo_huber_loss, scm_loss, scm_tangent
from .precondition import precondition, precondition_scalings
from .sampling import self_consistency_error
from .steps import cfg, cm_step, ddim_step, dpmpp_2m_step, euler_step, heun_step, trigflow_step
from .tangents import check_jvp, fd_tangent

__version__ = "0.1.0"

__all__ = [
    "precondition",
    "precondition_scalings",
    "pseudo_huber_loss",
    "scm_loss",
    "scm_tangent",
    "meanflow_loss",
    "euler_step",
    "heun_step",
    "dpmpp_2m_step",
    "ddim_step",
    "cm_step",
    "trigflow_step",
    "cfg",
    "sampling",
    "schedules",
    "self_consistency_error",
    "ema",
    "attention",
    "attention_jvp",
    "merge_attention_partials",
    "sde_steps",
    "flow_steps",
    "vp_steps",
    "blocks",
    "embeddings",
    "testing",
    "training",
    "convert_prediction",
    "convert_time",
    "add_noise",
    "flow_map",
    "flow_map_loss",
    "dmd_loss",
    "denoising_loss",
    "fd_tangent",
    "check_jvp",
]
