// IEEE float16 <-> float32 without any instruction-set extension (the contract rounds Y to float16 to nearest
// even, overflow to ±inf, as NumPy's astype does).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace sage_cpu {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0) {  // zero or subnormal: mantissa · 2^-24, exact in float32
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
  }
  if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
  return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u);  // inf, NaN
  if (x >= 0x477ff000u) return sign | 0x7c00u;                                    // rounds to >= 65520: inf
  if (x < 0x38800000u) {  // below 2^-14: a float16 subnormal, value · 2^24 rounded to an integer (ties to even)
    return sign | static_cast<uint16_t>(std::nearbyint(bits_to_float(x) * 16777216.0f));
  }
  x += 0xfffu + ((x >> 13) & 1u);  // round the 13 dropped bits to nearest even; a carry moves the exponent
  return sign | static_cast<uint16_t>((x - 0x38000000u) >> 13);
}

}  // namespace sage_cpu
