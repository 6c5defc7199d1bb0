//! Strided layouts and the loops that walk them: gathering a strided view
//! into a contiguous buffer, writing a contiguous buffer through a strided
//! view, and visiting the offsets of several operands that share an index
//! space (broadcast operands have stride 0).

/// How a tensor's elements sit in its storage: element `[i0, i1, ...]` is at
/// `offset + i0*strides[0] + i1*strides[1] + ...`. Strides are in elements.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    pub shape: Vec<usize>,
    pub strides: Vec<usize>,
    pub offset: usize,
}

impl Layout {
    pub fn contiguous(shape: &[usize]) -> Layout {
        Layout {
            shape: shape.to_vec(),
            strides: kiln_ir::contiguous_strides(shape),
            offset: 0,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// PyTorch's `is_contiguous`: strides of size-1 dims are ignored.
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for i in (0..self.shape.len()).rev() {
            if self.shape[i] != 1 {
                if self.strides[i] != expected {
                    return false;
                }
                expected *= self.shape[i];
            }
        }
        true
    }

    /// Largest storage index touched plus one (0 for an empty tensor).
    pub fn storage_extent(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        self.offset
            + self
                .shape
                .iter()
                .zip(&self.strides)
                .map(|(&n, &s)| (n - 1) * s)
                .sum::<usize>()
            + 1
    }
}

/// Calls `f(row_offsets, row_len, inner_strides)` for each run of the last
/// dimension, over output linear indices `[start, end)` (which must begin and
/// end on row boundaries unless the tensor is 0-d). `offsets[k]` is operand
/// k's storage offset at the start of the row.
pub fn for_each_row<const K: usize>(
    shape: &[usize],
    strides: [&[usize]; K],
    offsets: [usize; K],
    start: usize,
    end: usize,
    mut f: impl FnMut([usize; K], usize, [usize; K]),
) {
    let nd = shape.len();
    if nd == 0 {
        if start < end {
            f(offsets, 1, [0; K]);
        }
        return;
    }
    let row = shape[nd - 1];
    if row == 0 {
        return;
    }
    let inner: [usize; K] = std::array::from_fn(|k| strides[k][nd - 1]);
    // Multi-index of the first row.
    let mut idx = vec![0usize; nd];
    let mut rem = start / row;
    for d in (0..nd - 1).rev() {
        idx[d] = rem % shape[d];
        rem /= shape[d];
    }
    let mut cur: [usize; K] = std::array::from_fn(|k| {
        offsets[k] + (0..nd - 1).map(|d| idx[d] * strides[k][d]).sum::<usize>()
    });
    let mut pos = start;
    while pos < end {
        f(cur, row, inner);
        pos += row;
        // Advance the multi-index over the outer dimensions.
        let mut d = nd - 1;
        while d > 0 {
            d -= 1;
            idx[d] += 1;
            for k in 0..K {
                cur[k] += strides[k][d];
            }
            if idx[d] < shape[d] {
                break;
            }
            for k in 0..K {
                cur[k] -= strides[k][d] * shape[d];
            }
            idx[d] = 0;
        }
    }
}

/// Copies the strided view `layout` of `src` into a new contiguous Vec.
pub fn gather<T: crate::Element>(src: &[T], layout: &Layout) -> Vec<T> {
    let n = layout.numel();
    let mut out = crate::buffers::alloc_uninit::<T>(n);
    if n == 0 {
        return out;
    }
    if layout.is_contiguous() {
        out.copy_from_slice(&src[layout.offset..layout.offset + n]);
        return out;
    }
    let work = |start: usize, dst: &mut [T]| {
        let mut w = 0;
        for_each_row(
            &layout.shape,
            [&layout.strides],
            [layout.offset],
            start,
            start + dst.len(),
            |[o], len, [s]| {
                if s == 1 {
                    dst[w..w + len].copy_from_slice(&src[o..o + len]);
                } else {
                    for i in 0..len {
                        dst[w + i] = src[o + i * s];
                    }
                }
                w += len;
            },
        );
    };
    // Static parts of whole rows (see `par`).
    let row = layout.shape.last().copied().unwrap_or(1);
    crate::par::chunks_mut(&mut out, crate::PAR_THRESHOLD / 2, row, work);
    out
}

/// Writes the contiguous `src` (broadcast if it has one element) through the
/// strided view `layout` of `dst`. The view must not overlap itself
/// (expanded views are rejected by the frontend before they get here).
pub fn scatter<T: Copy>(dst: &mut [T], layout: &Layout, src: &[T]) {
    let n = layout.numel();
    assert!(src.len() == n || src.len() == 1, "scatter: source length");
    let mut r = 0;
    for_each_row(
        &layout.shape,
        [&layout.strides],
        [layout.offset],
        0,
        n,
        |[o], len, [s]| {
            for i in 0..len {
                dst[o + i * s] = if src.len() == 1 { src[0] } else { src[r + i] };
            }
            r += len;
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gather_transposed() {
        // [[0,1,2],[3,4,5]] transposed -> [[0,3],[1,4],[2,5]]
        let src: Vec<i64> = (0..6).collect();
        let l = Layout {
            shape: vec![3, 2],
            strides: vec![1, 3],
            offset: 0,
        };
        assert_eq!(gather(&src, &l), vec![0, 3, 1, 4, 2, 5]);
        assert!(!l.is_contiguous());
    }

    #[test]
    fn gather_large_parallel_matches_serial() {
        let src: Vec<f32> = (0..(300 * 257)).map(|i| i as f32).collect();
        let l = Layout {
            shape: vec![257, 300],
            strides: vec![1, 257],
            offset: 0,
        };
        let out = gather(&src, &l);
        for i in 0..257 {
            for j in 0..300 {
                assert_eq!(out[i * 300 + j], src[j * 257 + i]);
            }
        }
    }

    #[test]
    fn scatter_into_column() {
        let mut dst = vec![0i64; 6];
        let l = Layout {
            shape: vec![2],
            strides: vec![3],
            offset: 1,
        };
        scatter(&mut dst, &l, &[7, 8]);
        assert_eq!(dst, vec![0, 7, 0, 0, 8, 0]);
    }
}
