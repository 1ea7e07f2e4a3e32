// ZipLoRA element-wise CUDA kernels (no torch headers; the glue in zip_glue.cpp runs the GEMMs
// through cuBLAS via at::mm and calls these).
//
// pack:         A' = [s_c A_c diag(m_c); s_s A_s diag(m_s)]   ((r_c + r_s) x in), one launch for both.
// merger_grads: from G = u^T x ((r_c + r_s) x in, the token reduction done by the GEMM), one pass:
//               grad_m_c[j] = s_c Σ_k A_c[k, j] G[k, j],  grad_A_c[k, j] = s_c m_c[j] G[k, j]
//               (same for the style LoRA). One thread per column j, so loads along j coalesce.
// Accumulation in Acc (float; double for double).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace specops {
namespace cuda {
namespace zip_detail {

constexpr int kThreads = 256;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// v as a To: fp16 / bf16 through their intrinsics (the build disables their implicit conversions).
template <typename To, typename From>
__device__ __forceinline__ To convert(From v) {
  if constexpr (std::is_same_v<From, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<From, __nv_bfloat16>) return __bfloat162float(v);
  else if constexpr (std::is_same_v<To, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<To, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return static_cast<To>(v);
}

// grid (ceil(in / kThreads), r_c + r_s): row k of A' from row k of A_c or row k - r_c of A_s.
template <typename T>
__global__ void pack_kernel(const T* __restrict__ A_c, const T* __restrict__ m_c, double s_c,
                            int64_t r_c, const T* __restrict__ A_s, const T* __restrict__ m_s,
                            double s_s, int64_t in, T* __restrict__ out) {
  using Acc = typename AccOf<T>::type;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t k = blockIdx.y;
  if (j >= in) return;
  const bool content = k < r_c;
  const T* a = content ? A_c + k * in : A_s + (k - r_c) * in;
  const T* m = content ? m_c : m_s;
  const Acc s = static_cast<Acc>(content ? s_c : s_s);
  out[k * in + j] = convert<T>(s * convert<Acc>(m[j]) * convert<Acc>(a[j]));
}

// grid (ceil(in / kThreads), 2): blockIdx.y picks the LoRA. Null outputs are skipped.
template <typename T>
__global__ void merger_grads_kernel(const T* __restrict__ G, const T* __restrict__ A_c,
                                    const T* __restrict__ m_c, double s_c, int64_t r_c,
                                    T* __restrict__ gm_c, T* __restrict__ gA_c,
                                    const T* __restrict__ A_s, const T* __restrict__ m_s,
                                    double s_s, int64_t r_s, T* __restrict__ gm_s,
                                    T* __restrict__ gA_s, int64_t in) {
  using Acc = typename AccOf<T>::type;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (j >= in) return;
  const bool content = blockIdx.y == 0;
  const T* A = content ? A_c : A_s;
  const T* g = content ? G : G + r_c * in;
  const int64_t r = content ? r_c : r_s;
  T* gm = content ? gm_c : gm_s;
  T* gA = content ? gA_c : gA_s;
  const Acc s = static_cast<Acc>(content ? s_c : s_s);
  const Acc sm = s * convert<Acc>((content ? m_c : m_s)[j]);
  Acc sum = 0;
  for (int64_t k = 0; k < r; ++k) {
    const Acc gk = convert<Acc>(g[k * in + j]);
    sum += gk * convert<Acc>(A[k * in + j]);
    if (gA != nullptr) gA[k * in + j] = convert<T>(sm * gk);
  }
  if (gm != nullptr) gm[j] = convert<T>(s * sum);
}

inline unsigned blocks_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

}  // namespace zip_detail

template <typename T>
cudaError_t zip_pack(const T* A_c, const T* m_c, double s_c, int64_t r_c, const T* A_s,
                     const T* m_s, double s_s, int64_t r_s, int64_t in, T* out,
                     cudaStream_t stream) {
  using namespace zip_detail;
  if (in == 0 || r_c + r_s == 0) return cudaSuccess;
  if (r_c + r_s > 65535) return cudaErrorInvalidValue;  // grid.y limit
  dim3 grid(blocks_for(in), static_cast<unsigned>(r_c + r_s));
  pack_kernel<T><<<grid, kThreads, 0, stream>>>(A_c, m_c, s_c, r_c, A_s, m_s, s_s, in, out);
  return cudaGetLastError();
}

template <typename T>
cudaError_t zip_merger_grads(const T* G, const T* A_c, const T* m_c, double s_c, int64_t r_c,
                             T* gm_c, T* gA_c, const T* A_s, const T* m_s, double s_s,
                             int64_t r_s, T* gm_s, T* gA_s, int64_t in, cudaStream_t stream) {
  using namespace zip_detail;
  if (in == 0) return cudaSuccess;
  dim3 grid(blocks_for(in), 2);
  merger_grads_kernel<T><<<grid, kThreads, 0, stream>>>(G, A_c, m_c, s_c, r_c, gm_c, gA_c, A_s,
                                                        m_s, s_s, r_s, gm_s, gA_s, in);
  return cudaGetLastError();
}

#define SPECOPS_ZIP_INSTANTIATE(T)                                                              \
  template cudaError_t zip_pack<T>(const T*, const T*, double, int64_t, const T*, const T*,      \
                                   double, int64_t, int64_t, T*, cudaStream_t);                 \
  template cudaError_t zip_merger_grads<T>(const T*, const T*, const T*, double, int64_t, T*,   \
                                           T*, const T*, const T*, double, int64_t, T*, T*,     \
                                           int64_t, cudaStream_t);
SPECOPS_ZIP_INSTANTIATE(float)
SPECOPS_ZIP_INSTANTIATE(double)
SPECOPS_ZIP_INSTANTIATE(__half)
SPECOPS_ZIP_INSTANTIATE(__nv_bfloat16)
#undef SPECOPS_ZIP_INSTANTIATE

}  // namespace cuda
}  // namespace specops
