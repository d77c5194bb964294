//! Test-only reference: RFC 6962 §2.1 tree hash and proofs by their recursive definitions, and
//! RFC 9162 §2.1.3.2 / §2.1.4.2 verifiers by their iterative algorithms. None of it calls
//! `tlog`, so agreement between the two is evidence, not tautology.

use proptest::prelude::*;
use sha2::{Digest, Sha256};

use super::tlog::tests::{build, h, hs, CT_CONSISTENCY, CT_INCLUSION, CT_LEAVES, CT_ROOTS};
use super::tlog::{check_record, check_tree, prove_record, prove_tree, tree_hash};
use super::Hash;

fn leaf(data: &[u8]) -> Hash {
    Sha256::new()
        .chain_update([0u8])
        .chain_update(data)
        .finalize()
        .into()
}

fn node(l: &Hash, r: &Hash) -> Hash {
    Sha256::new()
        .chain_update([1u8])
        .chain_update(l)
        .chain_update(r)
        .finalize()
        .into()
}

/// Largest power of two strictly less than `n` (n >= 2), computed the slow, obvious way.
fn k_for(n: usize) -> usize {
    let mut k = 1;
    while k * 2 < n {
        k *= 2;
    }
    k
}

/// RFC 6962 MTH over leaf hashes.
fn mth(d: &[Hash]) -> Hash {
    match d.len() {
        0 => Sha256::digest([]).into(),
        1 => d[0],
        n => {
            let k = k_for(n);
            node(&mth(&d[..k]), &mth(&d[k..]))
        }
    }
}

/// RFC 6962 PATH(m, D[n]).
fn path(m: usize, d: &[Hash]) -> Vec<Hash> {
    if d.len() <= 1 {
        return Vec::new();
    }
    let k = k_for(d.len());
    let mut p;
    if m < k {
        p = path(m, &d[..k]);
        p.push(mth(&d[k..]));
    } else {
        p = path(m - k, &d[k..]);
        p.push(mth(&d[..k]));
    }
    p
}

/// RFC 6962 SUBPROOF(m, D[n], b).
fn subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
    let n = d.len();
    if m == n {
        return if b { Vec::new() } else { vec![mth(d)] };
    }
    let k = k_for(n);
    let mut p;
    if m <= k {
        p = subproof(m, &d[..k], b);
        p.push(mth(&d[k..]));
    } else {
        p = subproof(m - k, &d[k..], false);
        p.push(mth(&d[..k]));
    }
    p
}

/// RFC 9162 §2.1.3.2: verify an inclusion proof.
fn verify_inclusion(index: u64, size: u64, leaf_hash: &Hash, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f, mut s) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            r = node(p, &r);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            r = node(&r, p);
        }
        f >>= 1;
        s >>= 1;
    }
    s == 0 && r == *root
}

/// RFC 9162 §2.1.4.2: verify a consistency proof (with the `first == second` case, where
/// the proof is empty, handled as RFC 6962 defines it).
fn verify_consistency(first: u64, second: u64, h1: &Hash, h2: &Hash, proof: &[Hash]) -> bool {
    if first == 0 || first > second {
        return false;
    }
    if first == second {
        return proof.is_empty() && h1 == h2;
    }
    if proof.is_empty() {
        return false;
    }
    let mut path = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, *h1);
    }
    let (mut f, mut s) = (first - 1, second - 1);
    while f & 1 == 1 {
        f >>= 1;
        s >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s == 0 {
            return false;
        }
        if f & 1 == 1 || f == s {
            fr = node(c, &fr);
            sr = node(c, &sr);
            if f & 1 == 0 {
                while f & 1 == 0 && f != 0 {
                    f >>= 1;
                    s >>= 1;
                }
            }
        } else {
            sr = node(&sr, c);
        }
        f >>= 1;
        s >>= 1;
    }
    fr == *h1 && sr == *h2 && s == 0
}

fn leaves(n: usize) -> Vec<Hash> {
    (0..n as u64).map(|i| leaf(&i.to_be_bytes())).collect()
}

/// Every way a single byte of a proof can be changed by `x` must break both verifiers.
fn assert_flips_break(proof: &[Hash], x: u8, ok: impl Fn(&[Hash]) -> bool) {
    for i in 0..proof.len() * 32 {
        let mut bad = proof.to_vec();
        bad[i / 32][i % 32] ^= x;
        assert!(!ok(&bad), "flipping byte {i} was not detected");
    }
}

#[test]
fn reference_verifiers_accept_the_ct_vectors() {
    let d: Vec<Hash> = CT_LEAVES.iter().map(|l| leaf(l)).collect();
    for (i, root) in CT_ROOTS.iter().enumerate() {
        assert_eq!(mth(&d[..=i]), h(root));
    }
    for (n, t, p) in CT_INCLUSION {
        let p = hs(p);
        assert_eq!(path(n as usize, &d[..t as usize]), p);
        let root = h(CT_ROOTS[t as usize - 1]);
        assert!(verify_inclusion(n, t, &d[n as usize], &p, &root));
    }
    for (m, t, p) in CT_CONSISTENCY {
        let p = hs(p);
        assert_eq!(subproof(m as usize, &d[..t as usize], true), p);
        let (h1, h2) = (h(CT_ROOTS[m as usize - 1]), h(CT_ROOTS[t as usize - 1]));
        assert!(verify_consistency(m, t, &h1, &h2, &p));
    }
}

/// Every tree size up to 20, every leaf and every old size: tlog's proofs equal RFC 6962's,
/// both verifiers accept them, and every single-byte change is rejected by both.
#[test]
fn exhaustive_small_trees_agree_with_the_rfc() {
    const N: usize = 20;
    let d = leaves(N);
    let store = build(d.iter().copied());
    for t in 1..=N {
        let root = mth(&d[..t]);
        assert_eq!(tree_hash(t as u64, &store).unwrap(), root);
        let tu = t as u64;
        for i in 0..t {
            let iu = i as u64;
            let p = prove_record(tu, iu, &store).unwrap();
            assert_eq!(p, path(i, &d[..t]), "PATH({i}, {t})");
            assert!(check_record(&p, tu, &root, iu, &d[i]).is_ok());
            assert!(verify_inclusion(iu, tu, &d[i], &p, &root));
            assert_flips_break(&p, 0x01, |q| {
                check_record(q, tu, &root, iu, &d[i]).is_ok()
                    || verify_inclusion(iu, tu, &d[i], q, &root)
            });
            // Wrong index or size.
            for (j, s) in [(iu ^ 1, tu), (iu, tu + 1), (iu, tu.saturating_sub(1))] {
                if (j, s) != (iu, tu) {
                    let tlog_ok = check_record(&p, s, &root, j, &d[i]).is_ok();
                    let ref_ok = verify_inclusion(j, s, &d[i], &p, &root);
                    assert_eq!(tlog_ok, ref_ok, "({j}, {s}) vs ({i}, {t})");
                }
            }
        }
        for m in 1..=t {
            let mu = m as u64;
            let old = mth(&d[..m]);
            let p = prove_tree(tu, mu, &store).unwrap();
            assert_eq!(p, subproof(m, &d[..t], true), "PROOF({m}, {t})");
            assert!(check_tree(&p, tu, &root, mu, &old).is_ok());
            assert!(verify_consistency(mu, tu, &old, &root, &p));
            assert_flips_break(&p, 0x80, |q| {
                check_tree(q, tu, &root, mu, &old).is_ok()
                    || verify_consistency(mu, tu, &old, &root, q)
            });
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Random trees up to 300 leaves, random proofs within them.
    #[test]
    fn proofs_verify_with_both_verifiers_and_flips_break_them(
        n in 1usize..=300,
        picks in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<usize>(), 1u8..), 1..12),
    ) {
        let d = leaves(n);
        let store = build(d.iter().copied());
        prop_assert_eq!(tree_hash(n as u64, &store).unwrap(), mth(&d));
        for (a, b, pos, x) in picks {
            let t = 1 + a % n as u64;
            let i = b % t;
            let m = 1 + b % t;
            let root = mth(&d[..t as usize]);
            let leaf_hash = d[i as usize];

            let p = prove_record(t, i, &store).unwrap();
            prop_assert!(check_record(&p, t, &root, i, &leaf_hash).is_ok());
            prop_assert!(verify_inclusion(i, t, &leaf_hash, &p, &root));
            if !p.is_empty() {
                let mut bad = p.clone();
                let k = pos % (p.len() * 32);
                bad[k / 32][k % 32] ^= x;
                prop_assert!(check_record(&bad, t, &root, i, &leaf_hash).is_err());
                prop_assert!(!verify_inclusion(i, t, &leaf_hash, &bad, &root));
            }

            let old = mth(&d[..m as usize]);
            let c = prove_tree(t, m, &store).unwrap();
            prop_assert!(check_tree(&c, t, &root, m, &old).is_ok());
            prop_assert!(verify_consistency(m, t, &old, &root, &c));
            if !c.is_empty() {
                let mut bad = c.clone();
                let k = pos % (c.len() * 32);
                bad[k / 32][k % 32] ^= x;
                prop_assert!(check_tree(&bad, t, &root, m, &old).is_err());
                prop_assert!(!verify_consistency(m, t, &old, &root, &bad));
            }
        }
    }
}
