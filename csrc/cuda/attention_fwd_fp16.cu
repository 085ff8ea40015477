// Instantiations of the attention forward kernels for __half (one file per dtype: parallel builds).
#include "attention_fwd_launch.cuh"

namespace fastcm {
namespace attn {
template void launch_fwd_dispatch<__half>(const FwdParams& p, int kdqk, int kdv, bool jvp, cudaStream_t stream);
}  // namespace attn
}  // namespace fastcm
