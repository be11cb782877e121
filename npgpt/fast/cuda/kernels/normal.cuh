#pragma once
// Phi(x) = (1 + erf(x / sqrt 2)) / 2, the standard normal CDF, and phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
template <typename F> __device__ F normal_cdf(F x) { return (F)0.5 * ((F)1 + erf(x * (F)0.70710678118654752440)); }
template <typename F> __device__ F normal_pdf(F x) { return exp((F)-0.5 * x * x) * (F)0.39894228040143267794; }
