/* splitllm's CPU kernels: what the op files share (the ONNX Runtime C API as far as used, and helpers).
 *
 * The ONNX Runtime C API is used through the few entries below, declared here by their place in OrtApi
 * (the API is append-only: a place never changes, and ORT_API_VERSION_USED asks for a table that has them).
 */
#ifndef SPLITLLM_CPU_KERNELS_H
#define SPLITLLM_CPU_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <stdio.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define HAVE_X86 1
#endif

/* ---------------------------------------------------------------- the ONNX Runtime C API, as far as used */

typedef struct OrtStatus OrtStatus;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtValue OrtValue;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef void OrtApi; /* a table of function pointers, read by place */

typedef struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

enum { ORT_OK = 0, ORT_FAIL = 1, ORT_INVALID_ARGUMENT = 2 };
enum { TYPE_FLOAT = 1, TYPE_UINT8 = 2, TYPE_INT8 = 3, TYPE_INT32 = 6, TYPE_FLOAT16 = 10 };

struct OrtCustomOp;
typedef struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const struct OrtCustomOp*, const OrtApi*, const OrtKernelInfo*);
  const char* (*GetName)(const struct OrtCustomOp*);
  const char* (*GetExecutionProviderType)(const struct OrtCustomOp*);
  int (*GetInputType)(const struct OrtCustomOp*, size_t);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp*);
  int (*GetOutputType)(const struct OrtCustomOp*, size_t);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp*);
  void (*KernelCompute)(void*, OrtKernelContext*);
  void (*KernelDestroy)(void*);
  int (*GetInputCharacteristic)(const struct OrtCustomOp*, size_t);
  int (*GetOutputCharacteristic)(const struct OrtCustomOp*, size_t);
  int (*GetInputMemoryType)(const struct OrtCustomOp*, size_t);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp*);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp*);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp*);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp*);
  OrtStatus* (*CreateKernelV2)(const struct OrtCustomOp*, const OrtApi*, const OrtKernelInfo*, void**);
  OrtStatus* (*KernelComputeV2)(void*, OrtKernelContext*);
} OrtCustomOp;
#define CUSTOM_OP_VERSION 16 /* the first OrtCustomOp with CreateKernelV2 and KernelComputeV2: nothing after them is read */

#define ORT_API_VERSION_USED 17 /* ONNX Runtime 1.17: the first with KernelContext_ParallelFor */
/* Places in OrtApi (onnxruntime_c_api.h), checked by offsetof against that header */
#define API_CreateStatus 0
#define API_CreateCustomOpDomain 26
#define API_CustomOpDomain_Add 27
#define API_AddCustomOpDomain 28
#define API_GetTensorMutableData 51
#define API_GetDimensionsCount 61
#define API_GetDimensions 62
#define API_GetTensorTypeAndShape 65
#define API_KernelInfoGetAttribute_int64 86
#define API_KernelContext_GetInput 90
#define API_KernelContext_GetOutput 91
#define API_ReleaseStatus 93
#define API_ReleaseTensorTypeAndShapeInfo 99
#define API_KernelContext_ParallelFor 274

extern const OrtApi* g_api; /* set once, in RegisterCustomOps */
#define API(name) (((void* const*)g_api)[API_##name])

typedef OrtStatus* (*CreateStatus_t)(int, const char*);
typedef OrtStatus* (*CreateCustomOpDomain_t)(const char*, OrtCustomOpDomain**);
typedef OrtStatus* (*CustomOpDomain_Add_t)(OrtCustomOpDomain*, const OrtCustomOp*);
typedef OrtStatus* (*AddCustomOpDomain_t)(OrtSessionOptions*, OrtCustomOpDomain*);
typedef OrtStatus* (*KernelInfoGetAttribute_int64_t)(const OrtKernelInfo*, const char*, int64_t*);
typedef OrtStatus* (*KernelContext_GetInput_t)(const OrtKernelContext*, size_t, const OrtValue**);
typedef OrtStatus* (*KernelContext_GetOutput_t)(OrtKernelContext*, size_t, const int64_t*, size_t, OrtValue**);
typedef OrtStatus* (*GetTensorMutableData_t)(OrtValue*, void**);
typedef OrtStatus* (*GetTensorTypeAndShape_t)(const OrtValue*, OrtTensorTypeAndShapeInfo**);
typedef OrtStatus* (*GetDimensionsCount_t)(const OrtTensorTypeAndShapeInfo*, size_t*);
typedef OrtStatus* (*GetDimensions_t)(const OrtTensorTypeAndShapeInfo*, int64_t*, size_t);
typedef void (*ReleaseTensorTypeAndShapeInfo_t)(OrtTensorTypeAndShapeInfo*);
typedef void (*ReleaseStatus_t)(OrtStatus*);
typedef OrtStatus* (*KernelContext_ParallelFor_t)(const OrtKernelContext*, void (*)(void*, size_t), size_t, size_t,
                                                  void*);

#define CHECK(call)                       \
  do {                                    \
    OrtStatus* status_ = (call);          \
    if (status_) return status_;          \
  } while (0)

static inline OrtStatus* error(int code, const char* msg) { return ((CreateStatus_t)API(CreateStatus))(code, msg); }

/* An input's dims (at most 8) and rank. */
static inline OrtStatus* tensor(const OrtKernelContext* ctx, size_t index, const OrtValue** v, int64_t* dims, size_t* rank) {
  OrtTensorTypeAndShapeInfo* info;
  CHECK(((KernelContext_GetInput_t)API(KernelContext_GetInput))(ctx, index, v));
  CHECK(((GetTensorTypeAndShape_t)API(GetTensorTypeAndShape))(*v, &info));
  OrtStatus* s = ((GetDimensionsCount_t)API(GetDimensionsCount))(info, rank);
  if (!s && *rank > 8) s = error(ORT_INVALID_ARGUMENT, "splitllm op: an input has more than 8 dimensions");
  if (!s) s = ((GetDimensions_t)API(GetDimensions))(info, dims, *rank);
  ((ReleaseTensorTypeAndShapeInfo_t)API(ReleaseTensorTypeAndShapeInfo))(info);
  return s;
}

static inline void* data(const OrtValue* v) {
  void* p = NULL;
  OrtStatus* s = ((GetTensorMutableData_t)API(GetTensorMutableData))((OrtValue*)v, &p);
  return s ? NULL : p; /* a tensor input always has data; NULL only for an empty one */
}

/* IEEE half <-> float, portable (the AVX2 paths use F16C) */
static inline float half_to_float(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: renormalize */
      exp = 127 - 15 + 1;
      while (!(man & 0x400)) {
        man <<= 1;
        exp--;
      }
      bits = sign | (exp << 23) | ((man & 0x3FF) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7F800000 | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

/* rounded to nearest, ties to even, as F16C's _MM_FROUND_TO_NEAREST_INT (F. Giesen's float_to_half_fast3_rtne) */
static inline uint16_t float_to_half(float f) {
  const uint32_t infinity = 255u << 23, too_big = (127u + 16) << 23, magic = ((127u - 15) + (23 - 10) + 1) << 23;
  uint32_t u;
  memcpy(&u, &f, 4);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= too_big) {
    o = u > infinity ? 0x7E00 : 0x7C00; /* NaN stays NaN, the rest is infinity */
  } else if (u < 113u << 23) { /* a subnormal half or zero: let float addition round it */
    float x, m;
    memcpy(&x, &u, 4);
    memcpy(&m, &magic, 4);
    x += m;
    memcpy(&o, &x, 4);
    o -= magic;
  } else {
    o = (u + ((uint32_t)(15 - 127) << 23) + 0xFFF + ((u >> 13) & 1)) >> 13;
  }
  return (uint16_t)(o | sign >> 16);
}

#ifdef HAVE_X86
#define AVX2 __attribute__((target("avx2,fma,f16c")))
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx2,fma,f16c")))
#define LOAD_HALVES(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p))) /* 8 floats from 8 halves */

/* exp(x) to ~1 ulp: 2^n * p(r), x = n ln 2 + r (Cephes' expf, the polynomial every SIMD math library uses) */
AVX2 static inline __m256 exp_avx2(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3365f)), _mm256_set1_ps(88.3762f));
  __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

/* cpu_attention.c: the Attention op, and its switch to AVX2 (pick_kernels calls it where the CPU has AVX2) */
extern const OrtCustomOp attention_op;
void attention_use_avx2(void);
void attention_use_avx512(void);

#endif
