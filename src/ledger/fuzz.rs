//! Entry points for cargo-fuzz targets. Each feeds arbitrary bytes to the parsers and
//! checkers and asserts the invariants that must hold for every input; a panic here means a
//! real bug (a crash on untrusted input, or a broken invariant), never a bad input.

use super::note::VerifierKey;
use super::tlog::{
    check_record, check_tree, prove_record, prove_tree, record_hash, split_stored_hash_index,
    stored_hash_index, stored_hashes_for_record_hash, tree_hash,
};
use super::{base64, hex, parse_checkpoint, verify_note, Hash, Row};

/// Verifier key used when fuzzing note parsing (Go's published example key).
const FUZZ_VKEY: &str = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW";

/// Fuzzes every decoder: stored rows, hex, base64, checkpoints, verifier keys, signed notes.
/// Anything a decoder accepts must re-encode to the exact input (one spelling per value).
pub fn fuzz_decode(data: &[u8]) {
    if let Ok(row) = Row::decode_stored(data) {
        assert_eq!(row.encode_stored(), data, "stored row is not canonical");
        assert!(row.validate().is_ok(), "decoded row fails validation");
        let _ = row.verify_hash();
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(bytes) = base64::decode(text) {
        assert_eq!(base64::encode(&bytes), text, "base64 is not canonical");
    }
    if let Ok(hash) = hex::decode_hash(text) {
        assert_eq!(hex::encode(&hash), text, "hex is not canonical");
    }
    if let Ok(cp) = parse_checkpoint(text) {
        let body = cp
            .to_body()
            .expect("a parsed checkpoint has a valid origin");
        assert_eq!(parse_checkpoint(&body).as_ref(), Ok(&cp));
    }
    if let Ok(vk) = VerifierKey::parse(text) {
        assert_eq!(VerifierKey::parse(&vk.to_string()).as_ref(), Ok(&vk));
    }
    let _ = verify_note(text, FUZZ_VKEY);
    let _ = verify_note(FUZZ_NOTE, text);
}

const FUZZ_NOTE: &str = "If you think cryptography is the answer to your problem,\n\
    then you don't know what your problem is.\n\n\
    \u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";

/// Fuzzes the Merkle code: arbitrary claims against the checkers, then real proofs from a
/// small tree (which must verify) and a byte flipped in them (which must not).
pub fn fuzz_proofs(data: &[u8]) {
    let mut input = Input(data);

    // Arbitrary sizes, indexes, hashes and proofs: the checkers must simply say no.
    let (t, n) = (input.u64(), input.u64());
    let (th, h) = (input.hash(), input.hash());
    let proof: Vec<Hash> = (0..input.byte() % 70).map(|_| input.hash()).collect();
    let _ = check_record(&proof, t, &th, n, &h);
    let _ = check_tree(&proof, t, &th, n, &h);

    // Stored-hash index arithmetic round-trips everywhere below 2^63.
    let index = input.u64() >> 1;
    let (level, k) = split_stored_hash_index(index);
    assert_eq!(stored_hash_index(level, k), index, "index {index}");

    // A real tree of up to 100 leaves.
    let size = 1 + u64::from(input.byte() % 100);
    let mut store: Vec<Hash> = Vec::new();
    for i in 0..size {
        let new = stored_hashes_for_record_hash(i, record_hash(&i.to_be_bytes()), &store)
            .expect("in-memory tree append");
        store.extend(new);
    }
    let t = 1 + u64::from(input.byte()) % size;
    let n = u64::from(input.byte()) % t;
    let m = 1 + u64::from(input.byte()) % t;
    let root = tree_hash(t, &store).expect("tree hash");
    let old_root = tree_hash(m, &store).expect("tree hash");
    let leaf = record_hash(&n.to_be_bytes());
    let mut incl = prove_record(t, n, &store).expect("inclusion proof");
    let mut cons = prove_tree(t, m, &store).expect("consistency proof");
    assert!(check_record(&incl, t, &root, n, &leaf).is_ok());
    assert!(check_tree(&cons, t, &root, m, &old_root).is_ok());

    let (pos, flip) = (usize::from(input.byte()), input.byte());
    if flip != 0 && !incl.is_empty() {
        let i = pos % (incl.len() * 32);
        incl[i / 32][i % 32] ^= flip;
        assert!(check_record(&incl, t, &root, n, &leaf).is_err());
    }
    if flip != 0 && !cons.is_empty() {
        let i = pos % (cons.len() * 32);
        cons[i / 32][i % 32] ^= flip;
        assert!(check_tree(&cons, t, &root, m, &old_root).is_err());
    }
}

/// Reads fixed-size values from fuzz input, yielding zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn u64(&mut self) -> u64 {
        let mut out = [0u8; 8];
        out.iter_mut().for_each(|b| *b = self.byte());
        u64::from_be_bytes(out)
    }

    fn hash(&mut self) -> Hash {
        let mut out = [0u8; 32];
        out.iter_mut().for_each(|b| *b = self.byte());
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn fuzz_entry_points_accept_edge_inputs() {
        for data in [
            &b""[..],
            &[0xff; 64],
            &[0x00; 300],
            FUZZ_VKEY.as_bytes(),
            FUZZ_NOTE.as_bytes(),
            b"o\n1\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
        ] {
            fuzz_decode(data);
            fuzz_proofs(data);
        }
    }

    proptest! {
        #[test]
        fn fuzz_entry_points_never_panic(data in proptest::collection::vec(any::<u8>(), 0..400)) {
            fuzz_decode(&data);
            fuzz_proofs(&data);
        }
    }
}
