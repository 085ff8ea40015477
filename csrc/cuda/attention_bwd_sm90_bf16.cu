// Instantiations of the sm_90a attention backward kernels for __nv_bfloat16 (one file per dtype: parallel builds).
#include "attention_bwd_sm90_launch.cuh"

namespace fastcm {
namespace attn {
template void launch_bwd_sm90_dispatch<__nv_bfloat16>(const BwdParams& p, int kd, cudaStream_t stream);
}  // namespace attn
}  // namespace fastcm
