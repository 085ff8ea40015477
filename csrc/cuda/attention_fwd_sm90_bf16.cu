// Instantiations of the sm_90a attention forward kernels for __nv_bfloat16 (one file per dtype: parallel builds).
#include "attention_fwd_sm90_launch.cuh"

namespace fastcm {
namespace attn {
template void launch_fwd_sm90_dispatch<__nv_bfloat16>(const FwdParams& p, int kd, bool jvp, Sm90Kernel kernel,
                                                      bool q_regs, cudaStream_t stream);
}  // namespace attn
}  // namespace fastcm
