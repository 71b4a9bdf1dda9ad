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

// The same conversion with an integer zero point z in 0..15 folded into the subtracted constants, so that each pair
// comes out as the exact (c - z), -15..15, at no extra instruction: (1024 + c) - (1024 + z) for the fp16 low nibbles,
// (1024 + 16 c) / 16 - (64 + z) for the high ones, (128 + c) - (128 + z) in bf16. Layout v2's words hold two output
// columns (docs/INT4_V2.md): out[0], out[1] are column a's codes (zero za), out[2], out[3] column b's (zero zb).
// ZeroMagic<T> holds a column's two constants, built once per group by zero_magic<T>(z).
struct ZeroMagic {
  uint32_t sub;  // packed (1024 + z) in fp16 / (128 + z) in bf16, both halves
  uint32_t fma;  // packed -(64 + z) in fp16 (the high nibbles' FMA addend); unused in bf16
};

template <typename T>
__device__ __forceinline__ ZeroMagic zero_magic(uint32_t z);

template <>
__device__ __forceinline__ ZeroMagic zero_magic<__half>(uint32_t z) {
  // fp16 1024 + z: exponent 10, mantissa z (ulp 1); -(64 + z): sign, exponent 6, mantissa 16 z (ulp 1/16).
  return ZeroMagic{(0x6400u | z) * 0x00010001u, (0xD400u | (z << 4)) * 0x00010001u};
}

template <>
__device__ __forceinline__ ZeroMagic zero_magic<__nv_bfloat16>(uint32_t z) {
  return ZeroMagic{(0x4300u | z) * 0x00010001u, 0u};  // bf16 128 + z: exponent 7, mantissa z (ulp 1)
}

template <typename T>
__device__ __forceinline__ void dequant8_centered(uint32_t q, const ZeroMagic& a, const ZeroMagic& b,
                                                  uint32_t (&out)[4]);

template <>
__device__ __forceinline__ void dequant8_centered<__half>(uint32_t q, const ZeroMagic& a, const ZeroMagic& b,
                                                          uint32_t (&out)[4]) {
  constexpr uint32_t kLow = 0x000F000Fu, kHigh = 0x00F000F0u, k1024 = 0x64006400u, kSixteenth = 0x2C002C00u;
  const uint32_t shifted = q >> 8;
  const __half2 sixteenth = bits_as<__half2>(kSixteenth);
  out[0] = as_bits(__hsub2(bits_as<__half2>(lop3<kAndOr>(q, kLow, k1024)), bits_as<__half2>(a.sub)));
  out[1] = as_bits(__hfma2(bits_as<__half2>(lop3<kAndOr>(q, kHigh, k1024)), sixteenth, bits_as<__half2>(a.fma)));
  out[2] = as_bits(__hsub2(bits_as<__half2>(lop3<kAndOr>(shifted, kLow, k1024)), bits_as<__half2>(b.sub)));
  out[3] = as_bits(__hfma2(bits_as<__half2>(lop3<kAndOr>(shifted, kHigh, k1024)), sixteenth, bits_as<__half2>(b.fma)));
}

template <>
__device__ __forceinline__ void dequant8_centered<__nv_bfloat16>(uint32_t q, const ZeroMagic& a, const ZeroMagic& b,
                                                                 uint32_t (&out)[4]) {
  constexpr uint32_t kLow = 0x000F000Fu, k128 = 0x43004300u;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const uint32_t sub = j < 2 ? a.sub : b.sub;
    out[j] = as_bits(__hsub2(bits_as<__nv_bfloat162>(lop3<kAndOr>(q >> (4 * j), kLow, k128)),
                             bits_as<__nv_bfloat162>(sub)));
  }
}

}  // namespace lowrank_ops_sm80
