//! Deterministic elementary functions for the search.
//!
//! The platform's libm may return results that differ in the last bit between builds
//! (static and dynamic glibc pick different code paths, other targets use other libms), and a
//! lineage must be byte-identical on every gateway. These functions use only IEEE-754
//! addition, multiplication, division and square root, which Rust never fuses or reorders,
//! so every target computes the same bits. Accuracy is within a few ulp, far below what the
//! physics needs.

const LN2_HI: f64 = 0.693_147_180_369_123_8;
const LN2_LO: f64 = 1.908_214_929_270_587_7e-10;
const LN2: f64 = std::f64::consts::LN_2;
const LN10: f64 = std::f64::consts::LN_10;

/// 2^k for integer k in the normal range, by construction of the bits.
fn pow2(k: i64) -> f64 {
    f64::from_bits(((k + 1023) as u64) << 52)
}

/// e^x.
pub fn exp(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > 709.782_712_893_384 {
        return f64::INFINITY;
    }
    if x < -745.2 {
        return 0.0;
    }
    let k = (x / LN2 + if x < 0.0 { -0.5 } else { 0.5 }) as i64;
    let r = (x - k as f64 * LN2_HI) - k as f64 * LN2_LO;
    // Taylor series on |r| ≤ 0.35: 14 terms leave an error below 1e-17.
    let mut term = 1.0;
    let mut sum = 1.0;
    for n in 1..=14 {
        term = term * r / n as f64;
        sum += term;
    }
    // Scale in two steps so that results near the ends of the range stay exact.
    let half = k / 2;
    sum * pow2(half) * pow2(k - half)
}

/// Natural logarithm.
pub fn ln(x: f64) -> f64 {
    if x.is_nan() || x < 0.0 {
        return f64::NAN;
    }
    if x == 0.0 {
        return f64::NEG_INFINITY;
    }
    if x.is_infinite() {
        return x;
    }
    let (mut m, mut e) = (x, 0i64);
    if m < f64::MIN_POSITIVE {
        m *= pow2(54);
        e -= 54;
    }
    let bits = m.to_bits();
    e += ((bits >> 52) & 0x7ff) as i64 - 1023;
    m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m /= 2.0;
        e += 1;
    }
    // ln m = 2·atanh(s), s = (m − 1)/(m + 1), |s| ≤ 0.172.
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut power = s;
    let mut sum = 0.0;
    for n in (1..=23).step_by(2) {
        sum += power / n as f64;
        power *= s2;
    }
    let e = e as f64;
    e * LN2_HI + (e * LN2_LO + 2.0 * sum)
}

/// a^b for a > 0 (NaN for a < 0 unless b is an integer handled by the caller).
pub fn pow(a: f64, b: f64) -> f64 {
    if a == 1.0 || b == 0.0 {
        return 1.0;
    }
    exp(b * ln(a))
}

/// 10^x.
pub fn exp10(x: f64) -> f64 {
    exp(x * LN10)
}

/// (sin x, cos x), with Cody–Waite reduction by π/2.
pub fn sin_cos(x: f64) -> (f64, f64) {
    if !x.is_finite() {
        return (f64::NAN, f64::NAN);
    }
    const PIO2_1: f64 = 1.570_796_326_734_125_6;
    const PIO2_2: f64 = 6.077_100_506_303_966e-11;
    const PIO2_3: f64 = 2.022_266_248_711_166_5e-21;
    let q = (x * std::f64::consts::FRAC_2_PI + if x < 0.0 { -0.5 } else { 0.5 }) as i64;
    let qf = q as f64;
    let r = ((x - qf * PIO2_1) - qf * PIO2_2) - qf * PIO2_3;
    let r2 = r * r;
    // Taylor series on |r| ≤ π/4.
    let (mut s, mut c) = (0.0, 0.0);
    let (mut ts, mut tc) = (r, 1.0);
    for n in 0..11 {
        s += ts;
        c += tc;
        let k = (2 * n + 2) as f64;
        ts = -ts * r2 / (k * (k + 1.0));
        tc = -tc * r2 / ((k - 1.0) * k);
    }
    match q.rem_euclid(4) {
        0 => (s, c),
        1 => (c, -s),
        2 => (-s, -c),
        _ => (-c, s),
    }
}

pub fn sin(x: f64) -> f64 {
    sin_cos(x).0
}

pub fn cos(x: f64) -> f64 {
    sin_cos(x).1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        let tol = 4.0 * f64::EPSILON * b.abs().max(f64::MIN_POSITIVE);
        assert!((a - b).abs() <= tol || (a == b), "{a} vs {b}");
    }

    #[test]
    fn agree_with_libm_to_a_few_ulp() {
        for i in -2000..=2000 {
            let x = i as f64 * 0.3517;
            close(exp(x.clamp(-700.0, 700.0)), x.clamp(-700.0, 700.0).exp());
            if x > 0.0 {
                close(ln(x), x.ln());
                close(ln(x * 1e-300), (x * 1e-300).ln());
            }
            let y = i as f64 * 0.0137;
            assert!((sin(y) - y.sin()).abs() <= 4.0 * f64::EPSILON, "sin {y}");
            assert!((cos(y) - y.cos()).abs() <= 4.0 * f64::EPSILON, "cos {y}");
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(exp(1000.0), f64::INFINITY);
        assert_eq!(exp(-1000.0), 0.0);
        assert!(ln(-1.0).is_nan());
        close(exp10(-3.0), 1e-3);
        close(pow(2.0, 10.0), 1024.0);
        close(ln(5e-324), (5e-324f64).ln());
    }
}
