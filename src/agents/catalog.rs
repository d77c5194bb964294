//! The operator catalog: each operator is a documented physical equation with named inputs in
//! SI units.
//!
//! # How a chain evaluates
//! A genotype is `KO42` followed by 1–3 operators. The first operator after KO42 is the
//! *head*: its output (any unit) is the chain's quantity. Every later operator must be
//! dimensionless (unit `1`: a transmittance, a surviving fraction, a clock rate) and multiplies
//! the head, so a chain stays dimensionally consistent: `intensity × shield transmittance ×
//! decayed fraction` is a dose rate behind a shield after a delay. KO42 multiplies the product
//! by its phase factor. The result's unit is the head's unit.
//!
//! # KO42
//! KO42 is the kernel's anchor: the Zeqond phase modulation
//! `K(t) = 1 + α·sin(2π·f·t)` with `α = 1.29·10⁻³` and `f = 1.287 Hz` (one cycle per
//! Zeqond, 777 ms). `t` is the problem's `t` parameter in seconds, default 0, where the factor
//! is exactly 1. It never reads the wall clock, so results are reproducible.
//!
//! Equations are evaluated with [`super::detmath`], never the platform libm, so their results
//! are the same bits on every gateway.
//!
//! Inputs are looked up by name: a parameter given in the problem pins an input (the same name
//! pins it in every operator of the chain); every other input is a gene the search evolves
//! within its documented range.

/// G, m³·kg⁻¹·s⁻² (CODATA 2018).
pub const G: f64 = 6.674_30e-11;
/// Speed of light, m/s.
pub const C: f64 = 299_792_458.0;
/// Planck constant, J·s.
pub const H: f64 = 6.626_070_15e-34;
/// Coulomb constant 1/(4πε₀), N·m²·C⁻².
pub const K_E: f64 = 8.987_551_792_3e9;
/// KO42 modulation depth.
pub const KO42_ALPHA: f64 = 1.29e-3;
/// KO42 frequency, Hz: one cycle per Zeqond.
pub const KO42_HZ: f64 = 1.287;

/// A named input of an operator.
#[derive(Debug, Clone, Copy)]
pub struct Input {
    pub name: &'static str,
    pub unit: &'static str,
    /// Range the search draws the gene from when the problem does not pin it.
    pub lo: f64,
    pub hi: f64,
    /// Draw and mutate in log space (quantities spanning many orders of magnitude).
    pub log: bool,
}

const fn lin(name: &'static str, unit: &'static str, lo: f64, hi: f64) -> Input {
    Input {
        name,
        unit,
        lo,
        hi,
        log: false,
    }
}

const fn logr(name: &'static str, unit: &'static str, lo: f64, hi: f64) -> Input {
    Input {
        name,
        unit,
        lo,
        hi,
        log: true,
    }
}

/// One catalog entry.
#[derive(Debug, Clone, Copy)]
pub struct Operator {
    pub code: &'static str,
    pub name: &'static str,
    pub equation: &'static str,
    pub unit: &'static str,
    pub inputs: &'static [Input],
    /// Words of a problem statement that make this operator a likelier first pick.
    pub keywords: &'static [&'static str],
    eval: fn(&[f64]) -> f64,
}

impl Operator {
    /// Evaluates with `args` in the order of [`Operator::inputs`].
    pub fn eval(&self, args: &[f64]) -> f64 {
        (self.eval)(args)
    }

    pub fn dimensionless(&self) -> bool {
        self.unit == "1"
    }
}

use std::f64::consts::PI;

use super::detmath as m;

const M_MASS: Input = logr("M", "kg", 1e20, 1e32);
const R_DIST: Input = logr("r", "m", 1e3, 1e13);
const T_TIME: Input = logr("t", "s", 1e-3, 1e9);

/// The catalog, KO42 first. Codes are stable: they appear in stored lineages.
pub const CATALOG: &[Operator] = &[
    Operator {
        code: "KO42",
        name: "Zeqond phase kernel",
        equation: "K = 1 + α·sin(2π·f·t), α = 1.29e-3, f = 1.287 Hz",
        unit: "1",
        inputs: &[lin("t", "s", 0.0, 0.0)],
        keywords: &[],
        eval: |a| 1.0 + KO42_ALPHA * m::sin(2.0 * PI * KO42_HZ * a[0]),
    },
    Operator {
        code: "GR34",
        name: "circular geodesic proper-time rate (Schwarzschild)",
        equation: "dτ/dt = √(1 − 3GM/(r·c²))",
        unit: "1",
        inputs: &[M_MASS, R_DIST],
        keywords: &["geodesic", "orbit", "relativ", "proper time", "clock"],
        eval: |a| (1.0 - 3.0 * G * a[0] / (a[1] * C * C)).sqrt(),
    },
    Operator {
        code: "GR37",
        name: "Schwarzschild radius",
        equation: "r_s = 2GM/c²",
        unit: "m",
        inputs: &[M_MASS],
        keywords: &["black hole", "schwarzschild", "horizon"],
        eval: |a| 2.0 * G * a[0] / (C * C),
    },
    Operator {
        code: "GT01",
        name: "gravitational time dilation (static observer)",
        equation: "dτ/dt = √(1 − 2GM/(r·c²))",
        unit: "1",
        inputs: &[M_MASS, R_DIST],
        keywords: &["dilation", "gravitational", "clock"],
        eval: |a| (1.0 - 2.0 * G * a[0] / (a[1] * C * C)).sqrt(),
    },
    Operator {
        code: "NG01",
        name: "Newtonian gravitation",
        equation: "F = G·m1·m2/r²",
        unit: "N",
        inputs: &[
            logr("m1", "kg", 1.0, 1e30),
            logr("m2", "kg", 1.0, 1e30),
            R_DIST,
        ],
        keywords: &["gravit", "attract", "newton"],
        eval: |a| G * a[0] * a[1] / (a[2] * a[2]),
    },
    Operator {
        code: "EV01",
        name: "escape velocity",
        equation: "v = √(2GM/r)",
        unit: "m/s",
        inputs: &[M_MASS, R_DIST],
        keywords: &["escape", "launch"],
        eval: |a| (2.0 * G * a[0] / a[1]).sqrt(),
    },
    Operator {
        code: "OV01",
        name: "circular orbital velocity",
        equation: "v = √(GM/r)",
        unit: "m/s",
        inputs: &[M_MASS, R_DIST],
        keywords: &["orbit", "satellite", "velocity"],
        eval: |a| (G * a[0] / a[1]).sqrt(),
    },
    Operator {
        code: "KP01",
        name: "Kepler's third law (orbital period)",
        equation: "T = 2π·√(a³/(GM))",
        unit: "s",
        inputs: &[logr("a", "m", 1e5, 1e13), M_MASS],
        keywords: &["period", "orbit", "kepler", "transit", "mars"],
        eval: |a| 2.0 * PI * (a[0] * a[0] * a[0] / (G * a[1])).sqrt(),
    },
    Operator {
        code: "HO01",
        name: "harmonic oscillator displacement",
        equation: "x = A·cos(√(k/m)·t + φ)",
        unit: "m",
        inputs: &[
            logr("A", "m", 1e-4, 10.0),
            logr("k", "N/m", 1e-2, 1e5),
            logr("m", "kg", 1e-3, 1e3),
            T_TIME,
            lin("phi", "rad", 0.0, 2.0 * PI),
        ],
        keywords: &["oscillat", "spring", "vibrat", "harmonic"],
        eval: |a| a[0] * m::cos((a[1] / a[2]).sqrt() * a[3] + a[4]),
    },
    Operator {
        code: "PD01",
        name: "simple pendulum period (small angles)",
        equation: "T = 2π·√(L/g)",
        unit: "s",
        inputs: &[logr("L", "m", 1e-2, 1e2), lin("g", "m/s²", 0.1, 30.0)],
        keywords: &["pendulum", "swing"],
        eval: |a| 2.0 * PI * (a[0] / a[1]).sqrt(),
    },
    Operator {
        code: "RD01",
        name: "radioactive decay (surviving fraction)",
        equation: "N/N0 = exp(−ln2·t/T½)",
        unit: "1",
        inputs: &[T_TIME, logr("half_life", "s", 1.0, 1e12)],
        keywords: &["decay", "half-life", "half life", "isotope", "radioactive"],
        eval: |a| m::exp(-std::f64::consts::LN_2 * a[0] / a[1]),
    },
    Operator {
        code: "BL01",
        name: "Beer–Lambert attenuation (transmittance)",
        equation: "T = 10^(−ε·l·c)",
        unit: "1",
        inputs: &[
            logr("eps", "m²/mol", 1e-3, 1e4),
            logr("l", "m", 1e-4, 10.0),
            logr("conc", "mol/m³", 1e-3, 1e4),
        ],
        keywords: &[
            "absorb",
            "absorption",
            "beer",
            "lambert",
            "attenuat",
            "optical",
        ],
        eval: |a| m::exp10(-a[0] * a[1] * a[2]),
    },
    Operator {
        code: "SH01",
        name: "exponential shielding (narrow-beam transmission)",
        equation: "I/I0 = exp(−(μ/ρ)·ρ·d)",
        unit: "1",
        inputs: &[
            logr("mu_rho", "m²/kg", 1e-4, 1.0),
            logr("rho", "kg/m³", 1.0, 2e4),
            logr("d", "m", 1e-4, 10.0),
        ],
        keywords: &["shield", "radiation", "attenuat", "dose", "cosmic"],
        eval: |a| m::exp(-a[0] * a[1] * a[2]),
    },
    Operator {
        code: "IS01",
        name: "inverse-square intensity of a point source",
        equation: "I = P/(4π·r²)",
        unit: "W/m²",
        inputs: &[logr("P", "W", 1e-3, 1e27), R_DIST],
        keywords: &["intensity", "flux", "radiation", "source", "solar"],
        eval: |a| a[0] / (4.0 * PI * a[1] * a[1]),
    },
    Operator {
        code: "SR01",
        name: "Lorentz factor",
        equation: "γ = 1/√(1 − v²/c²)",
        unit: "1",
        inputs: &[logr("v", "m/s", 1.0, 2.9e8)],
        keywords: &["lorentz", "relativ", "speed"],
        eval: |a| 1.0 / (1.0 - a[0] * a[0] / (C * C)).sqrt(),
    },
    Operator {
        code: "KE01",
        name: "kinetic energy",
        equation: "E = ½·m·v²",
        unit: "J",
        inputs: &[logr("m", "kg", 1e-3, 1e3), logr("v", "m/s", 1.0, 2.9e8)],
        keywords: &["kinetic", "energy", "impact"],
        eval: |a| 0.5 * a[0] * a[1] * a[1],
    },
    Operator {
        code: "ME01",
        name: "mass–energy equivalence",
        equation: "E = m·c²",
        unit: "J",
        inputs: &[logr("m", "kg", 1e-3, 1e3)],
        keywords: &["mass-energy", "einstein", "annihilat"],
        eval: |a| a[0] * C * C,
    },
    Operator {
        code: "PE01",
        name: "photon energy (Planck relation)",
        equation: "E = h·f",
        unit: "J",
        inputs: &[logr("f", "Hz", 1e3, 1e21)],
        keywords: &["photon", "frequency", "planck", "light"],
        eval: |a| H * a[0],
    },
    Operator {
        code: "CL01",
        name: "Coulomb's law",
        equation: "F = k_e·q1·q2/r²",
        unit: "N",
        inputs: &[
            lin("q1", "C", -1e-3, 1e-3),
            lin("q2", "C", -1e-3, 1e-3),
            R_DIST,
        ],
        keywords: &["charge", "coulomb", "electric"],
        eval: |a| K_E * a[0] * a[1] / (a[2] * a[2]),
    },
    Operator {
        code: "HK01",
        name: "Hooke's law (spring force)",
        equation: "F = k·x",
        unit: "N",
        inputs: &[logr("k", "N/m", 1e-2, 1e5), logr("x", "m", 1e-4, 10.0)],
        keywords: &["spring", "hooke", "elastic"],
        eval: |a| a[0] * a[1],
    },
];

/// The operator with `code`.
pub fn find(code: &str) -> Option<(usize, &'static Operator)> {
    CATALOG.iter().enumerate().find(|(_, o)| o.code == code)
}

/// KO42's index in the catalog.
pub const KO42: usize = 0;

#[cfg(test)]
mod tests {
    use super::*;

    fn op(code: &str) -> &'static Operator {
        find(code).unwrap().1
    }

    #[test]
    fn catalog_has_sixteen_or_more_distinct_operators_ko42_first() {
        assert!(CATALOG.len() >= 16);
        assert_eq!(CATALOG[KO42].code, "KO42");
        let mut codes: Vec<_> = CATALOG.iter().map(|o| o.code).collect();
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), CATALOG.len());
        for o in CATALOG {
            assert!(!o.inputs.is_empty(), "{}", o.code);
            for i in o.inputs {
                assert!(
                    i.lo <= i.hi && (!i.log || i.lo > 0.0),
                    "{} {}",
                    o.code,
                    i.name
                );
            }
        }
    }

    #[test]
    fn equations_match_known_values() {
        let close =
            |a: f64, b: f64, rel: f64| assert!((a - b).abs() <= rel * b.abs(), "{a} vs {b}");
        // The Sun's Schwarzschild radius is about 2953 m.
        close(op("GR37").eval(&[1.989e30]), 2953.0, 1e-3);
        // Earth's surface escape velocity ≈ 11.19 km/s.
        close(op("EV01").eval(&[5.972e24, 6.371e6]), 11_186.0, 1e-3);
        // One half-life leaves half.
        close(op("RD01").eval(&[10.0, 10.0]), 0.5, 1e-12);
        // A 1 m pendulum at 9.81 m/s² swings in ≈ 2.006 s.
        close(op("PD01").eval(&[1.0, 9.81]), 2.006, 1e-3);
        // Absorbance 1 transmits a tenth.
        close(op("BL01").eval(&[1.0, 1.0, 1.0]), 0.1, 1e-12);
        close(
            op("SH01").eval(&[0.01, 1000.0, 0.1]),
            (-1.0f64).exp(),
            1e-12,
        );
        // Earth–Moon attraction ≈ 1.98e20 N.
        close(
            op("NG01").eval(&[5.972e24, 7.342e22, 3.844e8]),
            1.98e20,
            1e-2,
        );
        // KO42 is the identity at t = 0 and peaks a quarter cycle later.
        assert_eq!(op("KO42").eval(&[0.0]), 1.0);
        close(op("KO42").eval(&[0.25 / KO42_HZ]), 1.0 + KO42_ALPHA, 1e-12);
        // A year around the Sun at 1 AU.
        close(op("KP01").eval(&[1.496e11, 1.989e30]), 3.156e7, 2e-3);
        close(op("SR01").eval(&[0.6 * C]), 1.25, 1e-12);
        assert!(op("GR34").eval(&[1.989e30, 1.496e11]) < 1.0);
    }
}
