//! The vectorized pieces the kernels share: a branch-free `exp`, lane-split reductions, and
//! compiling a kernel for AVX2 + FMA where the CPU has them.

/// Defines `$name(args)`, which runs `$kernel::<FMA>(args)` compiled for AVX2 and FMA where the
/// CPU has them (x86-64 builds target the baseline without them), and for the build's target
/// otherwise (with FMA on aarch64, where it always exists).
macro_rules! simd_dispatch {
    ($($vis:vis fn $name:ident = $kernel:ident($($arg:ident: $ty:ty),* $(,)?);)*) => {$(
        $vis fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                fn wide($($arg: $ty),*) {
                    $kernel::<true>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU has the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $kernel::<{ cfg!(target_arch = "aarch64") }>($($arg),*)
        }
    )*};
}

/// Partial sums kept apart so that reductions vectorize (float addition is not associative, so the
/// compiler will not reorder a plain sum); the order is fixed, so results are deterministic.
pub(crate) const LANES: usize = 8;

#[inline(always)]
pub(crate) fn lane_max(values: &[f32], hidden: &[u8]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let (chunks, rest) = (values.chunks_exact(LANES), values.len() / LANES * LANES);
    for (v, h) in chunks.zip(hidden.chunks_exact(LANES)) {
        for l in 0..LANES {
            let x = if h[l] == 0 { v[l] } else { f32::NEG_INFINITY };
            lanes[l] = if x > lanes[l] { x } else { lanes[l] };
        }
    }
    for (l, (&x, &h)) in values[rest..].iter().zip(&hidden[rest..]).enumerate() {
        if h == 0 && x > lanes[l] {
            lanes[l] = x;
        }
    }
    lanes.into_iter().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// The largest of `values` (NaN-free input).
#[inline(always)]
pub(crate) fn lane_max_all(values: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    let rest = values.len() / LANES * LANES;
    for v in values.chunks_exact(LANES) {
        for l in 0..LANES {
            lanes[l] = if v[l] > lanes[l] { v[l] } else { lanes[l] };
        }
    }
    for (l, &x) in values[rest..].iter().enumerate() {
        if x > lanes[l] {
            lanes[l] = x;
        }
    }
    lanes.into_iter().fold(f32::NEG_INFINITY, |a, b| if b > a { b } else { a })
}

/// Values per lane that [`lane_sum`] and [`lane_dot`] add in f32 before moving the lane's partial
/// sum to its f64 total.
const BLOCK: usize = 16;

/// `Σ values`, within a few f32 roundings of the exact sum whatever the length. One f32 accumulator
/// per lane over a whole row is biased, not just noisy, on the rows the kernels sum: a vocabulary of
/// exponentials `exp(logit - max)` is a few terms near 1 and tens of thousands below half an ulp of
/// the lane's running sum, which round away one by one (-5e-6 relative on 32,000 exponentials of
/// logits with std 4.4; every token's log-sum-exp shifts by as much, and a sequence's summed
/// log-probs by that times its length: 1.3e-3 from float64 on the 24-layer fixture of
/// `dipole-models/tests/deep_precision.rs`, where transformers in f32 is 3.9e-4 off).
/// So each lane adds [`BLOCK`] values in f32 (the vectorized loop, unchanged), then moves its
/// partial sum to an f64 total: two conversions and adds per `LANES * BLOCK` values. Rows no
/// longer than that are one block, summed as before.
#[inline(always)]
pub(crate) fn lane_sum(values: &[f32]) -> f32 {
    if values.len() <= LANES * BLOCK {
        return block_sum(values).into_iter().sum();
    }
    let mut totals = [0f64; LANES];
    for block in values.chunks(LANES * BLOCK) {
        let lanes = block_sum(block);
        for l in 0..LANES {
            totals[l] += lanes[l] as f64;
        }
    }
    totals.into_iter().sum::<f64>() as f32
}

/// `Σ a·b` (slices of one length), f32 products summed as [`lane_sum`] sums.
#[inline(always)]
pub(crate) fn lane_dot(a: &[f32], b: &[f32]) -> f32 {
    if a.len() <= LANES * BLOCK {
        return block_dot(a, b).into_iter().sum();
    }
    let mut totals = [0f64; LANES];
    for (a, b) in a.chunks(LANES * BLOCK).zip(b.chunks(LANES * BLOCK)) {
        let lanes = block_dot(a, b);
        for l in 0..LANES {
            totals[l] += lanes[l] as f64;
        }
    }
    totals.into_iter().sum::<f64>() as f32
}

/// Per-lane f32 partial sums of `values`.
#[inline(always)]
fn block_sum(values: &[f32]) -> [f32; LANES] {
    let mut lanes = [0f32; LANES];
    let rest = values.len() / LANES * LANES;
    for v in values.chunks_exact(LANES) {
        for l in 0..LANES {
            lanes[l] += v[l];
        }
    }
    for (l, x) in values[rest..].iter().enumerate() {
        lanes[l] += x;
    }
    lanes
}

/// Per-lane f32 partial sums of `a·b`.
#[inline(always)]
fn block_dot(a: &[f32], b: &[f32]) -> [f32; LANES] {
    let mut lanes = [0f32; LANES];
    let rest = a.len() / LANES * LANES;
    for (x, y) in a.chunks_exact(LANES).zip(b.chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] += x[l] * y[l];
        }
    }
    for (l, (x, y)) in a[rest..].iter().zip(&b[rest..]).enumerate() {
        lanes[l] += x * y;
    }
    lanes
}

#[inline(always)]
pub(crate) fn mul_add<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    // without hardware FMA `f32::mul_add` is a libm call, and it would keep the loops scalar
    if FMA { a.mul_add(b, c) } else { a * b + c }
}

/// `e^x` in f32 within 2 ulp of the exact value, branch-free so that loops over it vectorize:
/// `x = n ln2 + r` with `|r| <= ln2 / 2`, `e^r` by its Taylor series to degree 7 (truncation
/// error below 6e-9), scaled by `2^n` through the exponent bits. Results below f32's smallest normal
/// (x < -87.34) flush to 0, x > 88 gives infinity; NaN stays NaN.
#[inline(always)]
pub(crate) fn exp<const FMA: bool>(x: f32) -> f32 {
    const LOWEST: f32 = -87.336_54; // ln of the smallest normal f32: 2^n stays a normal number
    const HIGHEST: f32 = 88.0; // keeps n <= 127 (e^88 is within 2x of f32's largest)
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer, kept in the low bits
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n * LN2_HI is exact for |n| <= 127
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(LOWEST, HIGHEST);
    let shifted = mul_add::<FMA>(xc, std::f32::consts::LOG2_E, ROUND);
    let n = shifted - ROUND;
    let r = mul_add::<FMA>(n, -LN2_LO, mul_add::<FMA>(n, -LN2_HI, xc));
    let mut p = 1.0 / 5040.0;
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = mul_add::<FMA>(p, r, c);
    }
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let scale = f32::from_bits(((n_bits + 127) << 23) as u32);
    let e = p * scale;
    if x < LOWEST {
        0.0
    } else if x > HIGHEST {
        f32::INFINITY
    } else {
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        fn check(exp: fn(f32) -> f32, name: &str) {
            let mut worst = 0f64;
            for i in 0..=400_000 {
                let x = -87.0 + 175.0 * i as f32 / 400_000.0;
                let (got, exact) = (exp(x) as f64, (x as f64).exp());
                let nearest = exact as f32;
                let ulp = (f32::from_bits(nearest.to_bits() + 1) - nearest) as f64;
                let ulps = (got - exact).abs() / ulp;
                worst = worst.max(ulps);
            }
            assert!(worst <= 2.0, "{name}: worst error {worst} ulp");
            assert_eq!(exp(0.0), 1.0, "{name}: e^0");
            assert_eq!(exp(f32::NEG_INFINITY), 0.0, "{name}: e^-inf");
            assert_eq!(exp(-100.0), 0.0, "{name}: underflow");
            assert_eq!(exp(f32::INFINITY), f32::INFINITY, "{name}: e^inf");
            assert_eq!(exp(89.0), f32::INFINITY, "{name}: overflow");
            assert!(exp(f32::NAN).is_nan(), "{name}: NaN");
        }
        check(exp::<false>, "separate multiply and add");
        check(exp::<true>, "fused multiply-add");
    }

    /// A vocabulary's exponentials `exp(logit - max)`, logits N(0, 4.4²) from a fixed stream: a
    /// few terms near 1, most far below an ulp of their sum.
    fn exponentials(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        let mut uniform = || {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        };
        let logits: Vec<f32> = (0..n).map(|_| (4.4 * (-2.0 * uniform().ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32).collect();
        let max = lane_max_all(&logits);
        logits.iter().map(|&x| ((x - max) as f64).exp() as f32).collect()
    }

    #[test]
    fn sums_of_many_small_terms_keep_their_mass() {
        // one f32 accumulator per lane loses about 5e-6 of these sums (always low); the log-sum-exp
        // of every token's log-prob shifts by as much
        for (n, seed) in [(32_000, 1), (49_152, 2), (151_936, 3), (300, 4), (7, 5)] {
            let values = exponentials(n, seed);
            let weights: Vec<f32> = (0..n).map(|i| ((i as f32) * 0.37).sin()).collect();
            let exact: f64 = values.iter().map(|&v| v as f64).sum();
            let exact_dot: f64 = values.iter().zip(&weights).map(|(&v, &w)| (v * w) as f64).sum();
            let error = (lane_sum(&values) as f64 / exact - 1.0).abs();
            assert!(error < 2.5e-7, "{n} terms: relative error {error:.2e}");
            let scale: f64 = values.iter().zip(&weights).map(|(&v, &w)| (v * w).abs() as f64).sum();
            let dot_error = (lane_dot(&values, &weights) as f64 - exact_dot).abs() / scale;
            assert!(dot_error < 2.5e-7, "{n} terms: dot product error {dot_error:.2e} of the absolute sum");
        }
        assert_eq!(lane_sum(&[]), 0.0);
        assert_eq!(lane_dot(&[], &[]), 0.0);
        // NaN and infinity propagate, in one block and in several
        for n in [3, 1000] {
            let mut values = vec![1.0f32; n];
            values[n - 2] = f32::NAN;
            assert!(lane_sum(&values).is_nan() && lane_dot(&values, &vec![1.0; n]).is_nan(), "{n}");
            values[n - 2] = f32::INFINITY;
            assert_eq!(lane_sum(&values), f32::INFINITY, "{n}");
            assert_eq!(lane_sum(&vec![0.5; n]), 0.5 * n as f32, "{n}");
        }
    }
}
