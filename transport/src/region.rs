//! The region of a masked image part (PROTOCOL.md §6.4) between its two forms: the codec's cell
//! mask (one `bool` per cell, row-major) and the wire's bitmap or rectangles.

use bytes::Bytes;
use unimic_protocol::limits::MAX_RECTS;
use unimic_protocol::{Rect, Region, VarInt};

/// The smaller wire form of `mask` (a `rows × cols` grid, row-major): rectangles (runs of equal
/// columns in consecutive rows merged) when they are fewer bytes and at most [`MAX_RECTS`],
/// else the bitmap. An empty region is sent as a bitmap (rectangles need at least one).
pub(crate) fn to_wire(mask: &[bool], cols: u32) -> Region {
    let bitmap = {
        let mut bits = vec![0u8; mask.len().div_ceil(8)];
        for (i, _) in mask.iter().enumerate().filter(|(_, &m)| m) {
            bits[i / 8] |= 1 << (i % 8);
        }
        bits
    };
    let bitmap_len = VarInt::saturating(bitmap.len() as u64).size() + bitmap.len();
    match rects(mask, cols) {
        Some(rects)
            if !rects.is_empty() && (rects.len() as u64) <= MAX_RECTS && {
                let len = VarInt::saturating(rects.len() as u64).size()
                    + rects
                        .iter()
                        .map(|r| r.top.size() + r.left.size() + r.height.size() + r.width.size())
                        .sum::<usize>();
                len < bitmap_len
            } =>
        {
            Region::Rects(rects)
        }
        _ => Region::Bitmap(Bytes::from(bitmap)),
    }
}

/// Rectangles covering exactly the set cells: the runs of each row, each extending the
/// rectangle of the identical run in the row above if there is one. `None` past [`MAX_RECTS`].
fn rects(mask: &[bool], cols: u32) -> Option<Vec<Rect>> {
    let cols = cols.max(1) as usize;
    let mut done: Vec<Rect> = Vec::new();
    // Open rectangles: (left, width, top, height), extended while the same run repeats.
    let mut open: Vec<(usize, usize, usize, usize)> = Vec::new();
    for (r, row) in mask.chunks(cols).enumerate() {
        let mut next = Vec::new();
        let mut c = 0;
        while c < row.len() {
            if !row[c] {
                c += 1;
                continue;
            }
            let left = c;
            while c < row.len() && row[c] {
                c += 1;
            }
            let width = c - left;
            match open
                .iter()
                .position(|&(l, w, t, h)| l == left && w == width && t + h == r)
            {
                Some(i) => {
                    let (l, w, t, h) = open.swap_remove(i);
                    next.push((l, w, t, h + 1));
                }
                None => next.push((left, width, r, 1)),
            }
        }
        done.extend(open.drain(..).map(rect));
        open = next;
        if done.len() + open.len() > MAX_RECTS as usize {
            return None;
        }
    }
    done.extend(open.into_iter().map(rect));
    Some(done)
}

fn rect((left, width, top, height): (usize, usize, usize, usize)) -> Rect {
    let v = |n: usize| VarInt::saturating(n as u64);
    Rect {
        top: v(top),
        left: v(left),
        height: v(height),
        width: v(width),
    }
}

/// The cell mask of a parsed region on a `rows × cols` grid (the parser has checked the bitmap
/// length and padding and that every rectangle lies inside the grid). Errors name what is wrong.
pub(crate) fn from_wire(region: &Region, rows: u32, cols: u32) -> Result<Vec<bool>, &'static str> {
    let (rows, cols) = (rows as usize, cols as usize);
    let cells = rows * cols;
    let mut mask = vec![false; cells];
    match region {
        Region::Bitmap(bits) => {
            if bits.len() != cells.div_ceil(8) {
                return Err("region bitmap length is not ceil(rows x cols / 8)");
            }
            for (i, m) in mask.iter_mut().enumerate() {
                *m = bits[i / 8] >> (i % 8) & 1 == 1;
            }
        }
        Region::Rects(rects) => {
            for r in rects {
                let (top, left, height, width) = (
                    r.top.to_usize(),
                    r.left.to_usize(),
                    r.height.to_usize(),
                    r.width.to_usize(),
                );
                let (Some(top), Some(left), Some(height), Some(width)) = (top, left, height, width)
                else {
                    return Err("region rectangle outside the grid");
                };
                if top.saturating_add(height) > rows || left.saturating_add(width) > cols {
                    return Err("region rectangle outside the grid");
                }
                for row in top..top + height {
                    mask[row * cols + left..row * cols + left + width].fill(true);
                }
            }
        }
        _ => return Err("unknown region kind"),
    }
    Ok(mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(rows: usize, cols: usize, f: impl Fn(usize, usize) -> bool) -> Vec<bool> {
        (0..rows * cols).map(|i| f(i / cols, i % cols)).collect()
    }

    #[test]
    fn a_block_goes_as_one_rectangle() {
        let m = mask(16, 16, |r, c| (4..10).contains(&r) && (2..7).contains(&c));
        let wire = to_wire(&m, 16);
        assert_eq!(
            wire,
            Region::Rects(vec![Rect {
                top: VarInt::from_u32(4),
                left: VarInt::from_u32(2),
                height: VarInt::from_u32(6),
                width: VarInt::from_u32(5),
            }])
        );
        assert_eq!(from_wire(&wire, 16, 16).unwrap(), m);
    }

    #[test]
    fn scattered_cells_go_as_a_bitmap_and_every_form_round_trips() {
        let checker = mask(8, 8, |r, c| (r + c) % 2 == 0);
        assert!(matches!(to_wire(&checker, 8), Region::Bitmap(_)));
        let shapes = [
            (8, 8, checker),
            (
                5,
                7,
                mask(5, 7, |r, c| r == 0 || c == 6 || (r == 3 && c < 3)),
            ),
            (3, 3, mask(3, 3, |_, _| false)),
            (3, 3, mask(3, 3, |_, _| true)),
            (1, 9, mask(1, 9, |_, c| c != 4)),
        ];
        for (rows, cols, m) in shapes {
            let wire = to_wire(&m, cols);
            assert_eq!(from_wire(&wire, rows, cols).unwrap(), m, "{wire:?}");
        }
    }

    /// Encoded size of a region body (after `region_kind`).
    fn wire_len(r: &Region) -> usize {
        match r {
            Region::Bitmap(b) => VarInt::saturating(b.len() as u64).size() + b.len(),
            Region::Rects(rs) => {
                VarInt::saturating(rs.len() as u64).size()
                    + rs.iter()
                        .map(|r| r.top.size() + r.left.size() + r.height.size() + r.width.size())
                        .sum::<usize>()
            }
            _ => usize::MAX,
        }
    }

    #[test]
    fn every_small_mask_and_random_masks_round_trip_no_longer_than_the_bitmap() {
        let mut cases: Vec<(u32, u32, Vec<bool>)> = (0..512u32)
            .map(|bits| (3, 3, (0..9).map(|i| bits >> i & 1 == 1).collect()))
            .collect();
        let mut z = 1u64;
        let mut next = || {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            z >> 33
        };
        for _ in 0..200 {
            let (rows, cols) = (1 + (next() % 40) as u32, 1 + (next() % 40) as u32);
            // Sparse, dense and blocky masks.
            let kind = next() % 3;
            let (r0, c0) = (next() % u64::from(rows), next() % u64::from(cols));
            let m = (0..rows * cols)
                .map(|i| match kind {
                    0 => next() % 10 == 0,
                    1 => next() % 10 != 0,
                    _ => u64::from(i / cols) >= r0 && u64::from(i % cols) >= c0,
                })
                .collect();
            cases.push((rows, cols, m));
        }
        for (rows, cols, m) in cases {
            let wire = to_wire(&m, cols);
            assert_eq!(from_wire(&wire, rows, cols).unwrap(), m, "{wire:?}");
            let bitmap = Region::Bitmap(Bytes::from(vec![0u8; m.len().div_ceil(8)]));
            assert!(wire_len(&wire) <= wire_len(&bitmap));
        }
    }

    #[test]
    fn rectangles_outside_the_grid_are_refused() {
        let r = Region::Rects(vec![Rect {
            top: VarInt::from_u32(1),
            left: VarInt::from_u32(0),
            height: VarInt::from_u32(3),
            width: VarInt::from_u32(1),
        }]);
        assert!(from_wire(&r, 3, 3).is_err());
        assert!(from_wire(&Region::Bitmap(Bytes::from_static(&[0])), 3, 3).is_err());
    }
}
