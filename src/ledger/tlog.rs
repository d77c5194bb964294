//! RFC 6962 Merkle tree over the log, stored append-only in Go `tlog`'s layout.
//!
//! # Hashes
//!
//! * record (leaf) hash: `SHA-256(0x00 ‖ data)` — [`record_hash`]. For smgate rows `data` is
//!   the 32 raw bytes of the row hash; the RFC 6962 test vectors hash arbitrary leaf data, which
//!   is why the leaf function is separate from everything else here.
//! * interior node: `SHA-256(0x01 ‖ left ‖ right)` — [`node_hash`].
//! * tree hash of `n` records: RFC 6962 `MTH`, splitting at the largest power of two strictly
//!   below `n`. The empty tree hashes to `SHA-256("")` ([`empty_tree_hash`]), as RFC 6962 says
//!   (Go `tlog` returns an all-zero hash there; a machine log is never empty, so it never shows).
//!
//! # Storage layout ("stored hash index")
//!
//! Every *complete* subtree — `2^level` leaves starting at a multiple of `2^level` — has one
//! stored hash, identified by `(level, k)` where `k` is its position among subtrees of that
//! level. Hashes are written in the order they become known while appending: record `n`
//! writes its leaf hash and then the hash of every subtree that leaf completes, i.e. one hash
//! per trailing 1 bit of `n` (levels `1..=trailing_ones(n)`). So the stream begins
//!
//! ```text
//! index: 0      1      2      3      4      5      6      7 ...
//! hash:  (0,0)  (0,1)  (1,0)  (0,2)  (0,3)  (1,1)  (2,0)  (0,4) ...
//! ```
//!
//! Record `n` therefore starts at `n + n/2 + n/4 + …` (every earlier record contributed one
//! leaf, every completed pair one level-1 node, and so on), and subtree `(level, k)` is written
//! by its last leaf `(k+1)·2^level − 1`, `level` positions after that leaf's hash. The layout
//! never rewrites a hash, so a store is a plain append-only array, and any range `[lo, hi)`
//! decomposes into at most 64 complete subtrees whose hashes are read directly. Proofs and
//! tree hashes thus read O(log n) stored hashes.
//!
//! Inputs that address storage (`n`, `t` in `prove_*`, `tree_hash`, `stored_hashes_*`) must be
//! at most [`MAX_TREE_SIZE`] so index arithmetic cannot overflow; `check_*` accept any `u64`.

use sha2::{Digest, Sha256};

use super::{Hash, LedgerError};

/// Largest tree size the storage functions accept (2^62 leaves); keeps every stored-hash
/// index below 2^63.
pub const MAX_TREE_SIZE: u64 = 1 << 62;

/// No proof for a tree of at most 2^64 leaves has more than 64 hashes.
const MAX_PROOF_LEN: usize = 64;

/// Source of stored hashes, by stored-hash index.
pub trait HashReader {
    /// Returns the hashes at `indexes`, in the same order, one per index. Callers ask for
    /// indexes in increasing order. An index not (yet) stored is an error.
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError>;
}

impl HashReader for [Hash] {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
        indexes
            .iter()
            .map(|&index| {
                usize::try_from(index)
                    .ok()
                    .and_then(|i| self.get(i))
                    .copied()
                    .ok_or(LedgerError::MissingHash { index })
            })
            .collect()
    }
}

impl HashReader for Vec<Hash> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
        self.as_slice().read_hashes(indexes)
    }
}

/// Leaf hash of a record: `SHA-256(0x00 ‖ data)`.
pub fn record_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0x00]);
    h.update(data);
    h.finalize().into()
}

/// Interior node hash: `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([0x01]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// RFC 6962 hash of the empty tree: `SHA-256("")`.
pub fn empty_tree_hash() -> Hash {
    Sha256::digest([]).into()
}

/// Position in the stored-hash stream of subtree `(level, n)`: the `n`-th subtree of
/// `2^level` leaves. Meaningful when `(n + 1) << level <= MAX_TREE_SIZE`; larger inputs give
/// a wrapped, meaningless index (never a panic).
pub fn stored_hash_index(level: u32, n: u64) -> u64 {
    // The subtree's hash is written right after the hashes of its last leaf and of the
    // `level - 1` smaller subtrees that leaf also completes.
    let last_leaf = if level >= 64 {
        u64::MAX
    } else {
        (n << level) | ((1u64 << level) - 1)
    };
    let mut start = 0u64;
    let mut m = last_leaf;
    while m > 0 {
        start = start.wrapping_add(m);
        m >>= 1;
    }
    start.wrapping_add(u64::from(level))
}

/// Inverse of [`stored_hash_index`]: the `(level, n)` of the subtree stored at `index`.
pub fn split_stored_hash_index(index: u64) -> (u32, u64) {
    // Record n starts at S(n) = n + n/2 + … ≤ 2n, so the record that wrote `index` is at least
    // index/2, and it is found within ~log2(index) steps from there.
    let mut n = index / 2;
    let mut start = stored_hash_index(0, n);
    loop {
        let next = n
            .checked_add(1)
            .and_then(|n1| start.checked_add(1 + u64::from(n1.trailing_zeros())));
        match next {
            Some(next) if next <= index => {
                n += 1;
                start = next;
            }
            _ => break,
        }
    }
    // `index - start` is at most trailing_ones(n) < 64.
    let level = (index - start) as u32;
    (level, n >> level)
}

/// Number of hashes stored for a tree of `n` records.
pub fn stored_hash_count(n: u64) -> u64 {
    if n == 0 {
        return 0;
    }
    let last = n - 1;
    stored_hash_index(0, last) + 1 + u64::from(last.trailing_ones())
}

/// The hashes to append to storage when adding record `n` (0-based) with leaf hash
/// `record_hash`, given a reader over the hashes of records `0..n`. They go at
/// `stored_hash_index(0, n)` onwards. Reads `trailing_ones(n)` hashes and returns one more
/// than that: two on average.
pub fn stored_hashes_for_record_hash<R: HashReader + ?Sized>(
    n: u64,
    record_hash: Hash,
    reader: &R,
) -> Result<Vec<Hash>, LedgerError> {
    if n >= MAX_TREE_SIZE {
        return Err(LedgerError::InvalidTreeRange {
            detail: format!("record index {n} exceeds the maximum tree size {MAX_TREE_SIZE}"),
        });
    }
    // Each trailing 1 bit of n completes a subtree whose left half is already stored: the
    // level-i left sibling is subtree (i, (n >> i) - 1), and n >> i is odd for these i.
    let completed = (n + 1).trailing_zeros();
    let indexes: Vec<u64> = (0..completed)
        .rev()
        .map(|level| stored_hash_index(level, (n >> level) - 1))
        .collect();
    let siblings = read_exact(reader, &indexes)?;
    let mut hashes = Vec::with_capacity(indexes.len() + 1);
    let mut h = record_hash;
    hashes.push(h);
    // `indexes` is sorted ascending, i.e. highest level first; combine lowest level first.
    for left in siblings.iter().rev() {
        h = node_hash(left, &h);
        hashes.push(h);
    }
    Ok(hashes)
}

/// The right edge of a tree of `size` records: the hashes of its maximal complete subtrees,
/// left to right (largest first), one per set bit of `size`. It is all an appender needs:
/// record `n`'s new stored hashes combine its leaf with the last `trailing_ones(n)` edge
/// hashes (exactly the siblings [`stored_hashes_for_record_hash`] reads), and the tree hash
/// folds the edge right to left. Loading it reads `popcount(size)` stored hashes; after that
/// appends read nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RightEdge {
    size: u64,
    hashes: Vec<Hash>,
}

impl RightEdge {
    /// The edge of the empty tree.
    pub fn empty() -> RightEdge {
        RightEdge {
            size: 0,
            hashes: Vec::new(),
        }
    }

    /// Reads the edge of the stored tree of `size` records.
    pub fn load<R: HashReader + ?Sized>(size: u64, reader: &R) -> Result<RightEdge, LedgerError> {
        check_size(size)?;
        let indexes: Vec<u64> = (0..64u32)
            .rev()
            .filter(|&level| (size >> level) & 1 == 1)
            .map(|level| stored_hash_index(level, (size >> level) - 1))
            .collect();
        Ok(RightEdge {
            size,
            hashes: read_exact(reader, &indexes)?,
        })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The edge of a tree of `size` records from its hashes as [`RightEdge::hashes`] gave
    /// them (a store that keeps the edge itself instead of every stored hash).
    pub fn from_hashes(size: u64, hashes: Vec<Hash>) -> Result<RightEdge, LedgerError> {
        check_size(size)?;
        if hashes.len() != size.count_ones() as usize {
            return Err(LedgerError::InvalidTreeRange {
                detail: format!(
                    "a right edge of size {size} has {} hashes, not {}",
                    size.count_ones(),
                    hashes.len()
                ),
            });
        }
        Ok(RightEdge { size, hashes })
    }

    /// The hashes of the maximal complete subtrees, largest (leftmost) first.
    pub fn hashes(&self) -> &[Hash] {
        &self.hashes
    }

    /// The hashes that appending record `size()` with leaf hash `record_hash` stores from
    /// `stored_hash_index(0, size())` on, written into `out`; the edge does not move (see
    /// [`RightEdge::advance`]), so a caller whose writes fail can keep it as it was.
    pub fn next_hashes(&self, record_hash: Hash, out: &mut Vec<Hash>) -> Result<(), LedgerError> {
        if self.size >= MAX_TREE_SIZE {
            return Err(LedgerError::InvalidTreeRange {
                detail: format!("record index {} exceeds the maximum tree size", self.size),
            });
        }
        let merged = self.size.trailing_ones() as usize;
        out.clear();
        out.push(record_hash);
        let mut h = record_hash;
        // One edge hash per set bit of the size, so at least one per trailing 1.
        for left in self.hashes[self.hashes.len() - merged..].iter().rev() {
            h = node_hash(left, &h);
            out.push(h);
        }
        Ok(())
    }

    /// Moves the edge past one record, given what [`RightEdge::next_hashes`] returned for it.
    pub fn advance(&mut self, new_hashes: &[Hash]) {
        let merged = self.size.trailing_ones() as usize;
        self.hashes.truncate(self.hashes.len() - merged);
        if let Some(top) = new_hashes.last() {
            self.hashes.push(*top);
        }
        self.size += 1;
    }

    /// Appends one record and returns its stored hashes.
    pub fn push(&mut self, record_hash: Hash) -> Result<Vec<Hash>, LedgerError> {
        let mut out = Vec::with_capacity(8);
        self.next_hashes(record_hash, &mut out)?;
        self.advance(&out);
        Ok(out)
    }

    /// RFC 6962 tree hash of the `size()` records.
    pub fn root(&self) -> Hash {
        let mut it = self.hashes.iter().rev();
        let Some(last) = it.next() else {
            return empty_tree_hash();
        };
        it.fold(*last, |right, left| node_hash(left, &right))
    }
}

/// RFC 6962 tree hash of the first `n` records.
pub fn tree_hash<R: HashReader + ?Sized>(n: u64, reader: &R) -> Result<Hash, LedgerError> {
    if n == 0 {
        return Ok(empty_tree_hash());
    }
    check_size(n)?;
    let mut need = Vec::new();
    sub_tree_index(0, n, &mut need);
    let hashes = read_exact(reader, &need)?;
    let mut cursor = hashes.iter();
    sub_tree_hash(0, n, &mut cursor)
}

/// Inclusion proof (RFC 6962 audit path, leaf side first) that record `n` is in the tree of
/// size `t`.
pub fn prove_record<R: HashReader + ?Sized>(
    t: u64,
    n: u64,
    reader: &R,
) -> Result<Vec<Hash>, LedgerError> {
    check_size(t)?;
    if n >= t {
        return Err(LedgerError::InvalidTreeRange {
            detail: format!("record {n} is not in a tree of size {t}"),
        });
    }
    let mut need = Vec::new();
    leaf_proof_index(0, t, n, &mut need);
    let hashes = read_exact(reader, &need)?;
    let mut cursor = hashes.iter();
    let mut proof = Vec::new();
    leaf_proof(0, t, n, &mut cursor, &mut proof)?;
    Ok(proof)
}

/// Consistency proof (RFC 6962 `PROOF(n, D[t])`) that the tree of size `n` is a prefix of the
/// tree of size `t`. Requires `1 <= n <= t`; the proof for `n == t` is empty.
pub fn prove_tree<R: HashReader + ?Sized>(
    t: u64,
    n: u64,
    reader: &R,
) -> Result<Vec<Hash>, LedgerError> {
    check_size(t)?;
    if n == 0 || n > t {
        return Err(LedgerError::InvalidTreeRange {
            detail: format!("cannot prove tree size {n} consistent with size {t}"),
        });
    }
    let mut need = Vec::new();
    tree_proof_index(0, t, n, &mut need);
    let hashes = read_exact(reader, &need)?;
    let mut cursor = hashes.iter();
    let mut proof = Vec::new();
    tree_proof(0, t, n, &mut cursor, &mut proof)?;
    Ok(proof)
}

/// Checks that `proof` proves record `n` with leaf hash `h` is in the tree of size `t` whose
/// hash is `th`.
pub fn check_record(
    proof: &[Hash],
    t: u64,
    th: &Hash,
    n: u64,
    h: &Hash,
) -> Result<(), LedgerError> {
    if n >= t || proof.len() > MAX_PROOF_LEN {
        return Err(LedgerError::ProofFailed);
    }
    let computed = run_record_proof(proof, 0, t, n, h)?;
    if &computed == th {
        Ok(())
    } else {
        Err(LedgerError::ProofFailed)
    }
}

/// Checks that `proof` proves the tree of size `n` with hash `h` is a prefix of the tree of
/// size `t` with hash `th`.
pub fn check_tree(proof: &[Hash], t: u64, th: &Hash, n: u64, h: &Hash) -> Result<(), LedgerError> {
    if n == 0 || n > t || proof.len() > MAX_PROOF_LEN {
        return Err(LedgerError::ProofFailed);
    }
    let (old, new) = run_tree_proof(proof, 0, t, n, h)?;
    if &old == h && &new == th {
        Ok(())
    } else {
        Err(LedgerError::ProofFailed)
    }
}

fn check_size(t: u64) -> Result<(), LedgerError> {
    if t > MAX_TREE_SIZE {
        return Err(LedgerError::InvalidTreeRange {
            detail: format!("tree size {t} exceeds the maximum {MAX_TREE_SIZE}"),
        });
    }
    Ok(())
}

fn read_exact<R: HashReader + ?Sized>(
    reader: &R,
    indexes: &[u64],
) -> Result<Vec<Hash>, LedgerError> {
    if indexes.is_empty() {
        return Ok(Vec::new());
    }
    let hashes = reader.read_hashes(indexes)?;
    if hashes.len() != indexes.len() {
        return Err(LedgerError::HashCountMismatch {
            wanted: indexes.len(),
            got: hashes.len(),
        });
    }
    Ok(hashes)
}

/// RFC 6962 split point: the largest power of two strictly less than `size` (`size >= 2`).
fn split(size: u64) -> u64 {
    1u64 << (63 - (size - 1).leading_zeros())
}

/// The largest complete subtree at the start of `[lo, hi)`: `(leaves, level)`. `lo` is always
/// a multiple of the result here, because ranges come from RFC 6962 splits.
fn first_complete_subtree(lo: u64, hi: u64) -> (u64, u32) {
    let level = 63 - (hi - lo).leading_zeros();
    (1u64 << level, level)
}

/// Appends the stored indexes of the complete subtrees covering `[lo, hi)`, left to right.
fn sub_tree_index(mut lo: u64, hi: u64, need: &mut Vec<u64>) {
    while lo < hi {
        let (k, level) = first_complete_subtree(lo, hi);
        need.push(stored_hash_index(level, lo >> level));
        lo += k;
    }
}

/// Hash of `[lo, hi)` (non-empty) from the hashes [`sub_tree_index`] asked for, consumed from
/// `hashes` in the same order.
fn sub_tree_hash<'a>(
    mut lo: u64,
    hi: u64,
    hashes: &mut impl Iterator<Item = &'a Hash>,
) -> Result<Hash, LedgerError> {
    let mut parts = Vec::new();
    while lo < hi {
        let (k, _) = first_complete_subtree(lo, hi);
        parts.push(*hashes.next().ok_or(LedgerError::ProofFailed)?);
        lo += k;
    }
    // Right to left: the last (smallest) subtree is the innermost right child.
    let mut h = parts.pop().ok_or(LedgerError::ProofFailed)?;
    while let Some(left) = parts.pop() {
        h = node_hash(&left, &h);
    }
    Ok(h)
}

fn leaf_proof_index(lo: u64, hi: u64, n: u64, need: &mut Vec<u64>) {
    if hi - lo <= 1 {
        return;
    }
    let k = split(hi - lo);
    if n < lo + k {
        leaf_proof_index(lo, lo + k, n, need);
        sub_tree_index(lo + k, hi, need);
    } else {
        sub_tree_index(lo, lo + k, need);
        leaf_proof_index(lo + k, hi, n, need);
    }
}

fn leaf_proof<'a>(
    lo: u64,
    hi: u64,
    n: u64,
    hashes: &mut impl Iterator<Item = &'a Hash>,
    proof: &mut Vec<Hash>,
) -> Result<(), LedgerError> {
    if hi - lo <= 1 {
        return Ok(());
    }
    let k = split(hi - lo);
    let sibling = if n < lo + k {
        leaf_proof(lo, lo + k, n, hashes, proof)?;
        sub_tree_hash(lo + k, hi, hashes)?
    } else {
        let left = sub_tree_hash(lo, lo + k, hashes)?;
        leaf_proof(lo + k, hi, n, hashes, proof)?;
        left
    };
    proof.push(sibling);
    Ok(())
}

fn tree_proof_index(lo: u64, hi: u64, n: u64, need: &mut Vec<u64>) {
    if n == hi {
        // The old tree's boundary falls on this subtree's end: the verifier either has it
        // (lo == 0: it is the old root) or needs it as one proof element.
        if lo != 0 {
            sub_tree_index(lo, hi, need);
        }
        return;
    }
    let k = split(hi - lo);
    if n <= lo + k {
        tree_proof_index(lo, lo + k, n, need);
        sub_tree_index(lo + k, hi, need);
    } else {
        sub_tree_index(lo, lo + k, need);
        tree_proof_index(lo + k, hi, n, need);
    }
}

fn tree_proof<'a>(
    lo: u64,
    hi: u64,
    n: u64,
    hashes: &mut impl Iterator<Item = &'a Hash>,
    proof: &mut Vec<Hash>,
) -> Result<(), LedgerError> {
    if n == hi {
        if lo != 0 {
            proof.push(sub_tree_hash(lo, hi, hashes)?);
        }
        return Ok(());
    }
    let k = split(hi - lo);
    let sibling = if n <= lo + k {
        tree_proof(lo, lo + k, n, hashes, proof)?;
        sub_tree_hash(lo + k, hi, hashes)?
    } else {
        let left = sub_tree_hash(lo, lo + k, hashes)?;
        tree_proof(lo + k, hi, n, hashes, proof)?;
        left
    };
    proof.push(sibling);
    Ok(())
}

/// Recomputes the hash of `[lo, hi)` from the leaf hash of `n` and the proof, which holds the
/// siblings innermost first (so this level's sibling is the last element).
fn run_record_proof(
    proof: &[Hash],
    lo: u64,
    hi: u64,
    n: u64,
    leaf: &Hash,
) -> Result<Hash, LedgerError> {
    if hi - lo == 1 {
        return if proof.is_empty() {
            Ok(*leaf)
        } else {
            Err(LedgerError::ProofFailed)
        };
    }
    let (sibling, inner) = proof.split_last().ok_or(LedgerError::ProofFailed)?;
    let k = split(hi - lo);
    if n < lo + k {
        let h = run_record_proof(inner, lo, lo + k, n, leaf)?;
        Ok(node_hash(&h, sibling))
    } else {
        let h = run_record_proof(inner, lo + k, hi, n, leaf)?;
        Ok(node_hash(sibling, &h))
    }
}

/// Recomputes `(hash of [lo, n), hash of [lo, hi))` from the old tree hash and the proof.
fn run_tree_proof(
    proof: &[Hash],
    lo: u64,
    hi: u64,
    n: u64,
    old: &Hash,
) -> Result<(Hash, Hash), LedgerError> {
    if n == hi {
        return match (lo, proof) {
            (0, []) => Ok((*old, *old)),
            (1.., [h]) => Ok((*h, *h)),
            _ => Err(LedgerError::ProofFailed),
        };
    }
    let (sibling, inner) = proof.split_last().ok_or(LedgerError::ProofFailed)?;
    let k = split(hi - lo);
    if n <= lo + k {
        let (oh, th) = run_tree_proof(inner, lo, lo + k, n, old)?;
        Ok((oh, node_hash(&th, sibling)))
    } else {
        let (oh, th) = run_tree_proof(inner, lo + k, hi, n, old)?;
        Ok((node_hash(sibling, &oh), node_hash(sibling, &th)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    #[test]
    fn right_edge_appends_the_stored_hashes_and_folds_to_the_tree_hash() {
        let mut stored: Vec<Hash> = Vec::new();
        let mut edge = RightEdge::empty();
        for n in 0..300u64 {
            let leaf = record_hash(&n.to_be_bytes());
            let want = stored_hashes_for_record_hash(n, leaf, &stored).unwrap();
            assert_eq!(edge.push(leaf).unwrap(), want, "record {n}");
            stored.extend(want);
            assert_eq!(
                edge.root(),
                tree_hash(n + 1, &stored).unwrap(),
                "size {}",
                n + 1
            );
            assert_eq!(
                RightEdge::load(n + 1, &stored).unwrap(),
                edge,
                "size {}",
                n + 1
            );
        }
        assert_eq!(RightEdge::empty().root(), empty_tree_hash());
    }

    use super::super::{base64, hex};
    use super::*;
    use std::cell::Cell;

    /// The Certificate Transparency reference tree's leaf inputs (RFC 6962 test data, as in
    /// certificate-transparency's merkle_tree_test.cc and transparency-dev/merkle testonly).
    pub(crate) const CT_LEAVES: [&[u8]; 8] = [
        b"",
        b"\x00",
        b"\x10",
        b"\x20\x21",
        b"\x30\x31",
        b"\x40\x41\x42\x43",
        b"\x50\x51\x52\x53\x54\x55\x56\x57",
        b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
    ];

    /// Roots of the reference tree for sizes 1..=8.
    pub(crate) const CT_ROOTS: [&str; 8] = [
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    /// Every complete-subtree hash of the 8-leaf reference tree, by level.
    const CT_NODES: [&[&str]; 4] = [
        &[
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
            "0298d122906dcfc10892cb53a73992fc5b9f493ea4c9badb27b791b4127a7fe7",
            "07506a85fd9dd2f120eb694f86011e5bb4662e5c415a62917033d4a9624487e7",
            "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            "4271a26be0d8a84f0bd54c8c302e7cb3a3b5d1fa6780a40bcce2873477dab658",
            "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
            "46f6ffadd3d06a09ff3c5860d2755c8b9819db7df44251788c7d8e3180de8eb1",
        ],
        &[
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
            "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
            "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        ],
        &[
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
        ],
        &["5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328"],
    ];

    /// Inclusion proofs `(leaf index, tree size, audit path)`, 0-based.
    pub(crate) const CT_INCLUSION: [(u64, u64, &[&str]); 7] = [
        (0, 1, &[]),
        (
            0,
            2,
            &["96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7"],
        ),
        (
            1,
            2,
            &["6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"],
        ),
        (
            2,
            3,
            &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
        ),
        (
            1,
            5,
            &[
                "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            0,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            5,
            8,
            &[
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    /// Consistency proofs `(old size, new size, path)`.
    pub(crate) const CT_CONSISTENCY: [(u64, u64, &[&str]); 5] = [
        (1, 1, &[]),
        (
            1,
            8,
            &[
                "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
            ],
        ),
        (
            6,
            8,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
        (
            2,
            5,
            &[
                "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
            ],
        ),
        (
            6,
            7,
            &[
                "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                "b08693ec2e721597130641e8211e7eedccb4c26413963eee6c1e2ed16ffb1a5f",
                "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            ],
        ),
    ];

    pub(crate) fn h(s: &str) -> Hash {
        hex::decode_hash(s).unwrap()
    }

    pub(crate) fn hs(ss: &[&str]) -> Vec<Hash> {
        ss.iter().map(|s| h(s)).collect()
    }

    /// Builds a store by appending the given leaf hashes one at a time, as the writer does.
    pub(crate) fn build(leaves: impl IntoIterator<Item = Hash>) -> Vec<Hash> {
        let mut store = Vec::new();
        for (n, leaf) in leaves.into_iter().enumerate() {
            let n = n as u64;
            assert_eq!(store.len() as u64, stored_hash_index(0, n));
            let new = stored_hashes_for_record_hash(n, leaf, &store).unwrap();
            store.extend(new);
            assert_eq!(store.len() as u64, stored_hash_count(n + 1));
        }
        store
    }

    fn ct_store() -> Vec<Hash> {
        build(CT_LEAVES.iter().map(|d| record_hash(d)))
    }

    /// Counts how many hashes a reader was asked for.
    struct Counting<'a> {
        inner: &'a [Hash],
        reads: Cell<usize>,
    }

    impl HashReader for Counting<'_> {
        fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, LedgerError> {
            self.reads.set(self.reads.get() + indexes.len());
            self.inner.read_hashes(indexes)
        }
    }

    #[test]
    fn rfc6962_hasher_vectors() {
        assert_eq!(
            hex::encode(&empty_tree_hash()),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex::encode(&record_hash(b"")),
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"
        );
        assert_eq!(
            hex::encode(&record_hash(b"L123456")),
            "395aa064aa4c29f7010acfe3f25db9485bbd4b91897b6ad7ad547639252b4d56"
        );
    }

    #[test]
    fn ct_reference_tree_roots_for_every_size() {
        let store = ct_store();
        assert_eq!(tree_hash(0, &store).unwrap(), empty_tree_hash());
        for (i, root) in CT_ROOTS.iter().enumerate() {
            assert_eq!(
                tree_hash(i as u64 + 1, &store).unwrap(),
                h(root),
                "size {}",
                i + 1
            );
        }
    }

    #[test]
    fn ct_reference_tree_nodes_sit_at_their_stored_indexes() {
        let store = ct_store();
        for (level, nodes) in CT_NODES.iter().enumerate() {
            for (k, node) in nodes.iter().enumerate() {
                let idx = stored_hash_index(level as u32, k as u64);
                assert_eq!(store[idx as usize], h(node), "level {level} index {k}");
                assert_eq!(split_stored_hash_index(idx), (level as u32, k as u64));
            }
        }
        assert_eq!(store.len(), 15);
    }

    #[test]
    fn ct_inclusion_proofs() {
        let store = ct_store();
        for (n, t, path) in CT_INCLUSION {
            let want = hs(path);
            assert_eq!(prove_record(t, n, &store).unwrap(), want, "({n}, {t})");
            let leaf = record_hash(CT_LEAVES[n as usize]);
            let root = h(CT_ROOTS[t as usize - 1]);
            check_record(&want, t, &root, n, &leaf).unwrap();
            for (i, (proof, t2, root2, n2, leaf2)) in corrupt_inclusion(&want, t, &root, n, &leaf)
                .into_iter()
                .enumerate()
            {
                assert!(
                    check_record(&proof, t2, &root2, n2, &leaf2).is_err(),
                    "probe {i} accepted for ({n}, {t})"
                );
            }
        }
    }

    type Probe = (Vec<Hash>, u64, Hash, u64, Hash);

    /// The corruptions of transparency-dev/merkle proof/verify_test.go corruptInclusionProof:
    /// wrong index, wrong size, wrong leaf or root, garbage around the proof, a flipped bit,
    /// a removed or inserted component. Every one must fail.
    fn corrupt_inclusion(proof: &[Hash], t: u64, root: &Hash, n: u64, leaf: &Hash) -> Vec<Probe> {
        let some: Hash = h("abacaba000000000000000000000000000000000000000000060061e00123456");
        let p = proof.to_vec();
        let with = |extra: Vec<Hash>, front: bool| {
            if front {
                [extra, p.clone()].concat()
            } else {
                [p.clone(), extra].concat()
            }
        };
        let mut probes: Vec<Probe> = vec![
            (p.clone(), t, *root, n.wrapping_sub(1), *leaf),
            (p.clone(), t, *root, n + 1, *leaf),
            (p.clone(), t, *root, n ^ 2, *leaf),
            (p.clone(), t * 2, *root, n, *leaf),
            (p.clone(), t / 2, *root, n, *leaf),
            (p.clone(), t, *root, n, record_hash(b"WrongLeaf")),
            (p.clone(), t, empty_tree_hash(), n, *leaf),
            (p.clone(), t, some, n, *leaf),
            (with(vec![[0; 32]], false), t, *root, n, *leaf),
            (with(vec![*root], false), t, *root, n, *leaf),
            (with(vec![[0; 32]], true), t, *root, n, *leaf),
            (with(vec![*root], true), t, *root, n, *leaf),
        ];
        for i in 0..p.len() {
            let mut bad = p.clone();
            bad[i][0] ^= 8;
            probes.push((bad, t, *root, n, *leaf));
        }
        if !p.is_empty() {
            probes.push((p[..p.len() - 1].to_vec(), t, *root, n, *leaf));
        }
        if p.len() > 1 {
            let inserted = [vec![p[0], some], p[1..].to_vec()].concat();
            probes.push((inserted, t, *root, n, *leaf));
        }
        probes
    }

    #[test]
    fn ct_consistency_proofs() {
        let store = ct_store();
        for (m, t, path) in CT_CONSISTENCY {
            let want = hs(path);
            assert_eq!(prove_tree(t, m, &store).unwrap(), want, "({m}, {t})");
            let old = h(CT_ROOTS[m as usize - 1]);
            let new = h(CT_ROOTS[t as usize - 1]);
            check_tree(&want, t, &new, m, &old).unwrap();
            if m != t {
                assert!(check_tree(&want, t, &old, m, &new).is_err());
            }
        }
    }

    /// transparency-dev/merkle compact/range_test.go TestGetRootHashGolden: leaf i's data is
    /// its index as two little-endian bytes.
    #[test]
    fn golden_roots_of_larger_trees() {
        let golden: [(u64, &str); 10] = [
            (10, "VjWMPSYNtCuCNlF/RLnQy6HcwSk6CIipfxm+hettA+4="),
            (15, "j4SulYmocFuxdeyp12xXCIgK6PekBcxzAIj4zbQzNEI="),
            (16, "c+4Uc6BCMOZf/v3NZK1kqTUJe+bBoFtOhP+P3SayKRE="),
            (100, "dUh9hYH88p0CMoHkdr1wC2szbhcLAXOejWpINIooKUY="),
            (255, "SmdsuKUqiod3RX2jyF2M6JnbdE4QuTwwipfAowI4/i0="),
            (256, "qFI0t/tZ1MdOYgyPpPzHFiZVw86koScXy9q3FU5casA="),
            (1000, "RXrgb8xHd55Y48FbfotJwCbV82Kx22LZfEbmBGAvwlQ="),
            (4095, "cWRFdQhPcjn9WyBXE/r1f04ejxIm5lvg40DEpRBVS0w="),
            (4096, "6uU/phfHg1n/GksYT6TO9aN8EauMCCJRl3dIK0HDs2M="),
            (10000, "VZcav65F9haHVRk3wre2axFoBXRNeUh/1d9d5FQfxIg="),
        ];
        let store = build((0..10000u32).map(|i| record_hash(&[i as u8, (i >> 8) as u8])));
        for (size, root) in golden {
            let want = base64::decode(root).unwrap();
            assert_eq!(
                tree_hash(size, &store).unwrap().to_vec(),
                want,
                "size {size}"
            );
        }
    }

    #[test]
    fn stored_hash_index_layout() {
        // (level, k) in the order the stream is written.
        let order = [
            (0, 0),
            (0, 1),
            (1, 0),
            (0, 2),
            (0, 3),
            (1, 1),
            (2, 0),
            (0, 4),
            (0, 5),
            (1, 2),
            (0, 6),
            (0, 7),
            (1, 3),
            (2, 1),
            (3, 0),
            (0, 8),
        ];
        for (index, &(level, k)) in order.iter().enumerate() {
            assert_eq!(stored_hash_index(level, k), index as u64);
            assert_eq!(split_stored_hash_index(index as u64), (level, k));
        }
        for n in 0..5000u64 {
            let base = stored_hash_index(0, n);
            for level in 0..=(n.trailing_ones()) {
                let k = n >> level;
                let idx = stored_hash_index(level, k);
                if level > 0 {
                    assert_eq!(idx, base + u64::from(level));
                }
                assert_eq!(split_stored_hash_index(idx), (level, k));
            }
        }
        assert_eq!(stored_hash_count(0), 0);
        assert_eq!(stored_hash_count(1), 1);
        assert_eq!(stored_hash_count(2), 3);
        assert_eq!(stored_hash_count(8), 15);
        // Extreme inputs do not panic.
        let _ = split_stored_hash_index(u64::MAX);
        let _ = stored_hash_index(200, u64::MAX);
        let (level, n) = split_stored_hash_index(stored_hash_index(3, MAX_TREE_SIZE / 8 - 1));
        assert_eq!((level, n), (3, MAX_TREE_SIZE / 8 - 1));
    }

    #[test]
    fn proofs_read_logarithmically_many_hashes() {
        let store = build((0..3000u32).map(|i| record_hash(&i.to_be_bytes())));
        for t in [1u64, 2, 3, 7, 100, 1023, 1024, 1025, 2999, 3000] {
            let log = 64 - u64::from(t.leading_zeros());
            let bound = 2 * log as usize + 2;
            for n in [0, t / 3, t / 2, t - 1] {
                let r = Counting {
                    inner: &store,
                    reads: Cell::new(0),
                };
                prove_record(t, n, &r).unwrap();
                assert!(
                    r.reads.get() <= bound,
                    "prove_record({t},{n}) read {}",
                    r.reads.get()
                );
                if n > 0 {
                    r.reads.set(0);
                    prove_tree(t, n, &r).unwrap();
                    assert!(
                        r.reads.get() <= bound,
                        "prove_tree({t},{n}) read {}",
                        r.reads.get()
                    );
                }
                r.reads.set(0);
                tree_hash(t, &r).unwrap();
                assert!(r.reads.get() <= log as usize + 1);
            }
        }
    }

    #[test]
    fn invalid_ranges_and_short_storage_are_errors() {
        let store = ct_store();
        assert!(prove_record(8, 8, &store).is_err());
        assert!(prove_record(0, 0, &store).is_err());
        assert!(prove_tree(8, 0, &store).is_err());
        assert!(prove_tree(8, 9, &store).is_err());
        assert!(prove_record(MAX_TREE_SIZE + 1, 0, &store).is_err());
        assert!(tree_hash(u64::MAX, &store).is_err());
        assert!(stored_hashes_for_record_hash(MAX_TREE_SIZE, [0; 32], &store).is_err());
        // Asking beyond what is stored is an error, not a panic.
        assert_eq!(
            tree_hash(9, &store),
            Err(LedgerError::MissingHash { index: 15 })
        );
        assert!(prove_record(16, 3, &store).is_err());

        struct Short;
        impl HashReader for Short {
            fn read_hashes(&self, _: &[u64]) -> Result<Vec<Hash>, LedgerError> {
                Ok(vec![[0; 32]])
            }
        }
        assert_eq!(
            tree_hash(7, &Short),
            Err(LedgerError::HashCountMismatch { wanted: 3, got: 1 })
        );
        assert!(prove_record(8, 3, &Short).is_err());
        assert!(stored_hashes_for_record_hash(7, [0; 32], &Short).is_err());
    }

    #[test]
    fn checks_reject_nonsense_without_panicking() {
        let x = [7u8; 32];
        assert!(check_record(&[], 0, &x, 0, &x).is_err());
        assert!(check_record(&[], 1, &x, 0, &x).is_ok());
        assert!(check_record(&[x; 65], u64::MAX, &x, 5, &x).is_err());
        assert!(check_record(&[x; 64], u64::MAX, &x, u64::MAX - 1, &x).is_err());
        assert!(check_tree(&[], 0, &x, 0, &x).is_err());
        assert!(check_tree(&[], 5, &x, 5, &x).is_ok());
        assert!(check_tree(&[], 5, &x, 6, &x).is_err());
        assert!(check_tree(&[x; 64], u64::MAX, &x, u64::MAX - 1, &x).is_err());
        assert!(check_tree(&[x; 3], u64::MAX, &x, 1, &x).is_err());
    }
}
