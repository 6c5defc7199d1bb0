//! Tensor factories: zeros, ones, full, arange, linspace, eye, rand, randn
//! and their `_like` forms. Factories produce f32 unless a dtype is given,
//! like PyTorch's default dtype.

use crate::error::{Error, Result};
use crate::random;
use crate::tensor::Tensor;
use kiln_cpu::CpuStorage;
use kiln_ir::DType;

fn from_f64s(v: Vec<f64>, shape: &[usize], dtype: DType) -> Tensor {
    let t = Tensor::from_storage(CpuStorage::F64(v).to_dtype(dtype), shape);
    crate::trace::created(&t, false);
    t
}

impl Tensor {
    pub fn full(shape: &[usize], value: f64, dtype: DType) -> Tensor {
        let t = Tensor::from_storage(CpuStorage::full(dtype, kiln_ir::numel(shape), value), shape);
        crate::trace::created(&t, false);
        t
    }

    pub fn zeros(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::full(shape, 0.0, dtype)
    }

    pub fn ones(shape: &[usize], dtype: DType) -> Tensor {
        Tensor::full(shape, 1.0, dtype)
    }

    pub fn zeros_like(&self) -> Result<Tensor> {
        Ok(Tensor::zeros(&self.shape(), self.dtype()))
    }

    pub fn ones_like(&self) -> Result<Tensor> {
        Ok(Tensor::ones(&self.shape(), self.dtype()))
    }

    pub fn full_like(&self, value: f64) -> Result<Tensor> {
        Ok(Tensor::full(&self.shape(), value, self.dtype()))
    }

    /// `torch.arange(start, end, step)`: i64 when all three are integral
    /// (pass `DType::I64`), else the given float dtype.
    pub fn arange(start: f64, end: f64, step: f64, dtype: DType) -> Result<Tensor> {
        if step == 0.0 {
            return Err(Error::op("arange", "step must be nonzero"));
        }
        if (end - start) * step < 0.0 {
            return Err(Error::op(
                "arange",
                format!("upper bound and larger bound inconsistent with step sign (start {start}, end {end}, step {step})"),
            ));
        }
        let n = ((end - start) / step).ceil().max(0.0) as usize;
        let v: Vec<f64> = (0..n).map(|i| start + i as f64 * step).collect();
        Ok(from_f64s(v, &[n], dtype))
    }

    /// `torch.linspace(start, end, steps)`, computed like PyTorch (from both
    /// ends, so the last element is exactly `end`).
    pub fn linspace(start: f64, end: f64, steps: usize, dtype: DType) -> Result<Tensor> {
        let v: Vec<f64> = if steps == 1 {
            vec![start]
        } else {
            let step = (end - start) / (steps - 1) as f64;
            let half = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < half {
                        start + step * i as f64
                    } else {
                        end - step * (steps - 1 - i) as f64
                    }
                })
                .collect()
        };
        if dtype == DType::F32 {
            // PyTorch computes f32 linspace in f32.
            let stepf = if steps > 1 {
                ((end - start) / (steps - 1) as f64) as f32
            } else {
                0.0
            };
            let half = steps / 2;
            let v: Vec<f32> = (0..steps)
                .map(|i| {
                    if i < half {
                        start as f32 + stepf * i as f32
                    } else {
                        end as f32 - stepf * (steps - 1 - i) as f32
                    }
                })
                .collect();
            let t = Tensor::from_storage(CpuStorage::F32(v), &[steps]);
            crate::trace::created(&t, false);
            return Ok(t);
        }
        Ok(from_f64s(v, &[steps], dtype))
    }

    /// Identity matrix `n x m`.
    pub fn eye(n: usize, m: usize, dtype: DType) -> Tensor {
        let mut v = vec![0.0; n * m];
        for i in 0..n.min(m) {
            v[i * m + i] = 1.0;
        }
        from_f64s(v, &[n, m], dtype)
    }

    /// Uniform [0, 1) from the global generator (`kiln::manual_seed`).
    pub fn rand(shape: &[usize], dtype: DType) -> Tensor {
        from_f64s(
            random::uniform_vec(kiln_ir::numel(shape), 0.0, 1.0),
            shape,
            dtype,
        )
    }

    /// Standard normal from the global generator.
    pub fn randn(shape: &[usize], dtype: DType) -> Tensor {
        from_f64s(
            random::normal_vec(kiln_ir::numel(shape), 0.0, 1.0),
            shape,
            dtype,
        )
    }

    pub fn rand_like(&self) -> Tensor {
        Tensor::rand(&self.shape(), self.dtype())
    }

    pub fn randn_like(&self) -> Tensor {
        Tensor::randn(&self.shape(), self.dtype())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factories() {
        let a = Tensor::arange(0.0, 5.0, 1.0, DType::I64).unwrap();
        assert_eq!(a.to_vec::<i64>(), vec![0, 1, 2, 3, 4]);
        let l = Tensor::linspace(0.5, 1.5, 5, DType::F32).unwrap();
        assert_eq!(l.to_vec::<f32>(), vec![0.5, 0.75, 1.0, 1.25, 1.5]);
        let e = Tensor::eye(2, 3, DType::F64);
        assert_eq!(e.to_vec::<f64>(), vec![1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        crate::manual_seed(3);
        let r1 = Tensor::randn(&[10], DType::F32).to_vec::<f32>();
        crate::manual_seed(3);
        let r2 = Tensor::randn(&[10], DType::F32).to_vec::<f32>();
        assert_eq!(r1, r2);
        assert!(Tensor::arange(0.0, 1.0, 0.0, DType::F32).is_err());
    }
}
