//! The auditors' read path: C2SP tlog-tiles per log, under `/logs/<gateway>/<machine>/`.
//!
//! - `checkpoint`: the log's last accepted signed checkpoint note (the gateway's signature).
//! - `tile/<L>/<N>[.p/<W>]`: hash tile `N` of level `L` (height 8, so `2^(8L)`-leaf subtree
//!   hashes), `W` of them when partial; the 32-byte hashes concatenated.
//! - `tile/entries/<N>[.p/<W>]`: entry bundle `N`: each leaf's entry as a big-endian u16
//!   length then the bytes. A leaf's entry is its row's 32-byte hash (the tree's leaf is
//!   `SHA-256(0x00 ‖ row hash)`), so any tlog-tiles client recomputes leaves from bundles; full
//!   rows are at `/v1/gateways/<gateway>/machines/<machine>/rows`.
//!
//! `<N>` is written in 3-digit path elements, all but the last prefixed with `x`
//! (`1234067` → `x001/x234/067`). Paths carry no tile height (always 8). A full tile never
//! changes, so it is served as immutable; a partial tile of width `W` never changes either, but
//! a client asks for it only until the full tile exists, so it gets a short cache life.
//! Only tiles inside the log's current tree are served; anything else is 404.

use super::check::{TILE_HEIGHT, TILE_WIDTH};

/// A parsed tile request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileRequest {
    /// `None` for an entry bundle, else the hash tile level.
    pub level: Option<u8>,
    pub index: u64,
    /// Hashes or entries asked for: 256, or the partial width.
    pub width: usize,
}

impl TileRequest {
    pub fn is_full(&self) -> bool {
        self.width == TILE_WIDTH
    }

    /// Whether the tree of `size` leaves holds all of this tile.
    pub fn within(&self, size: u64) -> bool {
        let level = u32::from(self.level.unwrap_or(0));
        let Some(end) = self
            .index
            .checked_mul(TILE_WIDTH as u64)
            .and_then(|s| s.checked_add(self.width as u64))
        else {
            return false;
        };
        level * TILE_HEIGHT < 64 && end <= size >> (level * TILE_HEIGHT)
    }
}

/// Parses the path elements after `tile/`: `<L>/<N…>[.p/<W>]` or `entries/<N…>[.p/<W>]`.
pub fn parse(parts: &[&str]) -> Option<TileRequest> {
    let (first, rest) = parts.split_first()?;
    let level = if *first == "entries" {
        None
    } else {
        let l: u8 = first.parse().ok()?;
        if first.len() != 1 || l > 7 {
            return None;
        }
        Some(l)
    };
    // `.p/<W>` splits into a last index element ending in `.p` and the width.
    let (index_parts, width) = match rest {
        [index @ .., last, raw] if last.ends_with(".p") => {
            let w: usize = raw.parse().ok()?;
            // One encoding per width: decimal without leading zeros.
            if !(1..TILE_WIDTH).contains(&w) || w.to_string() != *raw {
                return None;
            }
            let mut elems: Vec<&str> = index.to_vec();
            elems.push(last.strip_suffix(".p")?);
            (elems, w)
        }
        _ => (rest.to_vec(), TILE_WIDTH),
    };
    let index = parse_index(&index_parts)?;
    Some(TileRequest {
        level,
        index,
        width,
    })
}

fn parse_index(elems: &[&str]) -> Option<u64> {
    let (last, init) = elems.split_last()?;
    let mut n: u64 = 0;
    for (i, e) in init.iter().chain(std::iter::once(last)).enumerate() {
        let digits = if i < init.len() {
            e.strip_prefix('x')?
        } else {
            e
        };
        if digits.len() != 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        n = n
            .checked_mul(1000)?
            .checked_add(digits.parse::<u64>().ok()?)?;
    }
    // One encoding per index: no leading all-zero elements.
    if init.first().is_some_and(|e| *e == "x000") {
        return None;
    }
    Some(n)
}

/// The path elements of tile index `n` (`x001/x234/067`).
pub fn index_path(mut n: u64) -> String {
    let mut elems = vec![format!("{:03}", n % 1000)];
    n /= 1000;
    while n > 0 {
        elems.push(format!("x{:03}", n % 1000));
        n /= 1000;
    }
    elems.reverse();
    elems.join("/")
}

/// An entry bundle of 32-byte row hashes.
pub fn entry_bundle(row_hashes: &[[u8; 32]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(row_hashes.len() * 34);
    for h in row_hashes {
        out.extend_from_slice(&32u16.to_be_bytes());
        out.extend_from_slice(h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_paths_round_trip_and_have_one_encoding() {
        for n in [0, 5, 999, 1000, 1_234_067, u64::MAX / 7] {
            let p = index_path(n);
            let parts: Vec<&str> = p.split('/').collect();
            let mut all = vec!["0"];
            all.extend(parts.iter().copied());
            assert_eq!(parse(&all).unwrap().index, n, "{p}");
        }
        assert_eq!(index_path(1_234_067), "x001/x234/067");
        let r = parse(&["entries", "x001", "x234", "067.p", "8"]).unwrap();
        assert_eq!((r.level, r.index, r.width), (None, 1_234_067, 8));
        let r = parse(&["2", "000"]).unwrap();
        assert_eq!((r.level, r.index, r.width), (Some(2), 0, 256));
        for bad in [
            &["0", "5"][..],
            &["0", "x000", "005"],
            &["0", "001", "002"],
            &["0", "005.p", "256"],
            &["0", "005.p", "0"],
            &["0", "005.p", "08"],
            &["8", "000"],
            &["00", "000"],
            &["entries"],
        ] {
            assert!(parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn only_tiles_inside_the_tree_are_served() {
        let t = |level, index, width| TileRequest {
            level,
            index,
            width,
        };
        assert!(t(Some(0), 0, 256).within(256));
        assert!(!t(Some(0), 0, 256).within(255));
        assert!(t(Some(0), 0, 255).within(255));
        assert!(t(Some(1), 0, 1).within(256));
        assert!(!t(Some(1), 0, 2).within(511));
        assert!(t(None, 1, 3).within(259));
        assert!(!t(Some(0), u64::MAX, 256).within(u64::MAX));
    }
}
