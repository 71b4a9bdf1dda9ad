// Magic-number dequantisation of 8 unsigned 4-bit codes in one 32-bit word into 4 fp16x2 / bf16x2 registers, two
// codes per LOP3 and one packed subtract or FMA per pair (the trick of Marlin, Frantar et al. 2024, and of
// FasterTransformer's fast int4 conversion). For issue 19's int4 kernel v2 (docs/INT4_V2.md).
//
// Output order: out[j] holds the codes of nibbles j (low half) and j + 4 (high half), j = 0..3, as the exact values
// 0..15. Layout v2 stores the codes so that these pairs are the (k, k + 1) pairs of an mma B fragment.
//
// fp16: OR-ing a code c into the mantissa of 1024 (0x6400: exponent 10, ulp 1) gives 1024 + c exactly; the code one
//   nibble higher lands at mantissa bits 4..7, 1024 + 16 c. Per 8 codes: LOP3 (q & 0x000F000F) | 0x64006400 and
//   (q & 0x00F000F0) | 0x64006400 on q and q >> 8, then HSUB2 1024 on the low pairs and HFMA2 x * 1/16 - 64 on the
//   high ones: 1 shift, 4 LOP3, 4 packed ops.
// bf16: 128 (0x4300: exponent 7, ulp 1) has only 7 mantissa bits, so no second nibble fits; each pair is
//   (q >> 4j & 0x000F000F) | 0x43004300 minus 128: 3 shifts, 4 LOP3, 4 packed subtracts.
// The zero point and the scale are the kernel's: (c - z) s, one more packed op per pair on these exact values.
#pragma once

#include <stdint.h>
#include <string.h>

#include "sm80_intrinsics.cuh"

namespace lowrank_ops_sm80 {

// (a & b) | c as one LOP3: F(0xF0, 0xCC, 0xAA).
constexpr int kAndOr = (0xF0 & 0xCC) | 0xAA;

template <typename T2>
__device__ __forceinline__ T2 bits_as(uint32_t bits) {
  T2 v;
  memcpy(&v, &bits, sizeof(v));
  return v;
}

template <typename T2>
__device__ __forceinline__ uint32_t as_bits(T2 v) {
  uint32_t bits;
  memcpy(&bits, &v, sizeof(bits));
  return bits;
}

template <typename T>
__device__ __forceinline__ void dequant8(uint32_t q, uint32_t (&out)[4]);

template <>
__device__ __forceinline__ void dequant8<__half>(uint32_t q, uint32_t (&out)[4]) {
  constexpr uint32_t kLow = 0x000F000Fu, kHigh = 0x00F000F0u;
  constexpr uint32_t k1024 = 0x64006400u;        // fp16 1024, the magic exponent
  constexpr uint32_t kSixteenth = 0x2C002C00u;   // fp16 1/16
  constexpr uint32_t kMinus64 = 0xD400D400u;     // fp16 -64 = -1024 / 16
  const uint32_t shifted = q >> 8;
  const __half2 magic = bits_as<__half2>(k1024);
  out[0] = as_bits(__hsub2(bits_as<__half2>(lop3<kAndOr>(q, kLow, k1024)), magic));
  out[1] = as_bits(__hfma2(bits_as<__half2>(lop3<kAndOr>(q, kHigh, k1024)), bits_as<__half2>(kSixteenth),
                           bits_as<__half2>(kMinus64)));
  out[2] = as_bits(__hsub2(bits_as<__half2>(lop3<kAndOr>(shifted, kLow, k1024)), magic));
  out[3] = as_bits(__hfma2(bits_as<__half2>(lop3<kAndOr>(shifted, kHigh, k1024)), bits_as<__half2>(kSixteenth),
                           bits_as<__half2>(kMinus64)));
}

template <>
__device__ __forceinline__ void dequant8<__nv_bfloat16>(uint32_t q, uint32_t (&out)[4]) {
  constexpr uint32_t kLow = 0x000F000Fu;
  constexpr uint32_t k128 = 0x43004300u;  // bf16 128, the magic exponent
  const __nv_bfloat162 magic = bits_as<__nv_bfloat162>(k128);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    out[j] = as_bits(__hsub2(bits_as<__nv_bfloat162>(lop3<kAndOr>(q >> (4 * j), kLow, k128)), magic));
  }
}

}  // namespace lowrank_ops_sm80
