#pragma once
// Vectorisable float exp and log for the CPU loss kernels: plain arithmetic and bit casts only, so that
// `#pragma omp simd` loops compile to SIMD code (std::exp / std::log are library calls that block it).
// Range reduction plus minimax polynomials (the classic Cephes coefficients): ~1-2 ulp over their domains.
// Clamps and branches are integer selects on the bits (float compares may trap, which blocks if-conversion).
#include <cstdint>
#include <cstring>

namespace fastvl {

__attribute__((always_inline)) inline float bits_to_float(int32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

__attribute__((always_inline)) inline int32_t float_to_bits(float value) {
  int32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  return bits;
}

// exp(x) for x <= 0 (logits minus their row max); below -87 (exp < 1.7e-38, no normal float left) it
// returns exp(-87) instead of a denormal or 0, an absolute error under 2e-38.
__attribute__((always_inline)) inline float exp_nonpositive(float x) {
  // x < -87 (or -inf) <=> its bits, unsigned, exceed those of -87; +0 and positives are never clamped.
  // A bit-mask blend rather than a select, so the compiler cannot turn it into a branch around the rest.
  const int32_t bits = float_to_bits(x);
  const int32_t clamp = -static_cast<int32_t>(static_cast<uint32_t>(bits) > 0xC2AE0000u);
  x = bits_to_float((static_cast<int32_t>(0xC2AE0000u) & clamp) | (bits & ~clamp));
  // n = round(x / ln 2) by the 1.5 * 2^23 trick: no float-to-int conversion (whose possible trap blocks SIMD).
  const float shifted = x * 1.44269504088896341f + 12582912.f;
  const int32_t n_int = float_to_bits(shifted) - 0x4b400000;
  const float n = shifted - 12582912.f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln 2, ln 2 split in two
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float exp_r = p * r * r + r + 1.f;
  return exp_r * bits_to_float((n_int + 127) << 23);
}

// log(x) for normal x > 0; log(0) gives about -88.03 (finite), so 0 * log(0) is 0 without a branch.
__attribute__((always_inline)) inline float log_positive(float x) {
  const int32_t bits = float_to_bits(x);
  int32_t exponent = ((bits >> 23) & 0xff) - 127;
  const int32_t mantissa = bits & 0x007fffff;
  const bool high = mantissa > 0x3504f3;  // mantissa > sqrt(2): use m / 2 in [0.707, 1)
  float m = bits_to_float(mantissa | (high ? 0x3f000000 : 0x3f800000));
  exponent += high ? 1 : 0;
  const float f = m - 1.f;  // in [-0.29, 0.41]
  const float z = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z;
  const float e = static_cast<float>(exponent);
  y += -2.12194440e-4f * e;
  y += -0.5f * z;
  return f + y + 0.693359375f * e;
}

}  // namespace fastvl
