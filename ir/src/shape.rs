//! Shape arithmetic shared by eager kernels, the tracer and the IR:
//! element counts, contiguous strides and NumPy/PyTorch broadcasting.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("shapes {a:?} and {b:?} cannot be broadcast together (dimension {dim} is {da} vs {db})")]
pub struct ShapeError {
    pub a: Vec<usize>,
    pub b: Vec<usize>,
    pub dim: usize,
    pub da: usize,
    pub db: usize,
}

/// Number of elements of a shape (1 for a scalar).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Row-major strides of a contiguous tensor of this shape, as PyTorch gives
/// them (a size-1 dimension gets the stride of the following block).
pub fn contiguous_strides(shape: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; shape.len()];
    let mut acc = 1usize;
    for i in (0..shape.len()).rev() {
        strides[i] = acc;
        acc *= shape[i].max(1);
    }
    strides
}

/// The broadcast shape of two shapes (trailing dimensions aligned).
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Vec<usize>, ShapeError> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n {
            a[i + a.len() - n]
        } else {
            1
        };
        let db = if i + b.len() >= n {
            b[i + b.len() - n]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(ShapeError {
                a: a.to_vec(),
                b: b.to_vec(),
                dim: i,
                da,
                db,
            });
        };
    }
    Ok(out)
}

/// Output shape of a reduction over `dims` (kept as size 1 with `keepdim`).
pub fn reduced_shape(shape: &[usize], dims: &[usize], keepdim: bool) -> Vec<usize> {
    let mut out = Vec::new();
    for (i, &s) in shape.iter().enumerate() {
        if dims.contains(&i) {
            if keepdim {
                out.push(1);
            }
        } else {
            out.push(s);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_and_broadcast() {
        assert_eq!(contiguous_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(contiguous_strides(&[]), Vec::<usize>::new());
        assert_eq!(
            broadcast_shapes(&[3, 1, 5], &[4, 1]).unwrap(),
            vec![3, 4, 5]
        );
        assert!(broadcast_shapes(&[3, 2], &[3]).is_err());
    }
}
