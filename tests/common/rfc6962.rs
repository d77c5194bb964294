//! An RFC 6962 / RFC 9162 verifier written from the RFC text, independent of smgate's
//! `ledger::tlog`: Merkle tree hash by recursion, inclusion and consistency verification by
//! the iterative algorithms of RFC 9162 §2.1.3.2 and §2.1.4.2, and C2SP signed-note checks
//! with ring's Ed25519 directly.
#![allow(dead_code)]

use sha2::{Digest, Sha256};

pub type H = [u8; 32];

pub fn leaf(data: &[u8]) -> H {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

pub fn node(l: &H, r: &H) -> H {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(l);
    h.update(r);
    h.finalize().into()
}

/// MTH(D[n]) of RFC 6962 §2.1 over already-hashed leaves.
pub fn mth(leaves: &[H]) -> H {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = n.next_power_of_two() / 2;
            node(&mth(&leaves[..k]), &mth(&leaves[k..]))
        }
    }
}

/// RFC 9162 §2.1.3.2.
pub fn verify_inclusion(index: u64, size: u64, leaf_hash: &H, proof: &[H], root: &H) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf_hash;
    for p in proof {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

/// RFC 9162 §2.1.4.2.
pub fn verify_consistency(
    first: u64,
    second: u64,
    first_root: &H,
    second_root: &H,
    proof: &[H],
) -> bool {
    if first == second {
        return proof.is_empty() && first_root == second_root;
    }
    if first == 0 || first > second || proof.is_empty() {
        return false;
    }
    let mut path: Vec<H> = proof.to_vec();
    if first.is_power_of_two() {
        path.insert(0, *first_root);
    }
    let (mut f_n, mut s_n) = (first - 1, second - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut fr, mut sr) = (path[0], path[0]);
    for c in &path[1..] {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            fr = node(c, &fr);
            sr = node(c, &sr);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            sr = node(&sr, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    fr == *first_root && sr == *second_root && s_n == 0
}

pub fn unhex(s: &str) -> H {
    assert_eq!(s.len(), 64, "{s}");
    let mut out = [0u8; 32];
    for i in 0..32 {
        out[i] = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex");
    }
    out
}

const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn b64decode(s: &str) -> Vec<u8> {
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes().filter(|c| *c != b'=') {
        let v = B64.iter().position(|x| *x == c).expect("base64") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

/// Checks a C2SP signed note against a verifier key `<name>+<hex>+<base64(0x01‖pk)>` and
/// returns (origin, size, root).
pub fn open_checkpoint(note: &str, vkey: &str) -> (String, u64, H) {
    let mut parts = vkey.splitn(3, '+');
    let (name, hash_hex, key_b64) = (
        parts.next().unwrap(),
        parts.next().unwrap(),
        parts.next().unwrap(),
    );
    let key = b64decode(key_b64);
    assert_eq!(key[0], 1, "Ed25519 algorithm byte");
    let pk = &key[1..];
    let mut kh = Sha256::new();
    kh.update(name.as_bytes());
    kh.update(b"\n");
    kh.update([1u8]);
    kh.update(pk);
    let kh: [u8; 32] = kh.finalize().into();
    assert_eq!(
        hash_hex,
        format!("{:02x}{:02x}{:02x}{:02x}", kh[0], kh[1], kh[2], kh[3])
    );
    let (body, sigs) = note
        .split_once("\n\n")
        .expect("blank line before signatures");
    let body = format!("{body}\n");
    let line = sigs
        .lines()
        .find(|l| l.starts_with(&format!("\u{2014} {name} ")))
        .expect("signature by the key");
    assert!(note.ends_with('\n'));
    let sig = b64decode(line.rsplit(' ').next().unwrap());
    assert_eq!(&sig[..4], &kh[..4], "key hash prefix");
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, pk)
        .verify(body.as_bytes(), &sig[4..])
        .expect("valid Ed25519 signature");
    let mut lines = body.lines();
    let origin = lines.next().unwrap().to_string();
    let size = lines.next().unwrap().parse().unwrap();
    let root: H = b64decode(lines.next().unwrap()).try_into().unwrap();
    (origin, size, root)
}

#[test]
fn independent_verifier_agrees_with_rfc6962_test_vector_roots() {
    // The CT reference tree (certificate-transparency merkle_tree_test.cc).
    let leaves: Vec<Vec<u8>> = [
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    ]
    .iter()
    .map(|h| {
        (0..h.len() / 2)
            .map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).unwrap())
            .collect()
    })
    .collect();
    let hashed: Vec<H> = leaves.iter().map(|l| leaf(l)).collect();
    let roots = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];
    for (i, r) in roots.iter().enumerate() {
        assert_eq!(mth(&hashed[..=i]), unhex(r), "root of size {}", i + 1);
    }
}
