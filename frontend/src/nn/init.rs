//! `nn.init`: in-place initializers on the global generator
//! (`kiln::manual_seed`), with PyTorch's gain and fan rules. Each runs under
//! no_grad and keeps the tensor object (writes through `copy_`).

use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::random;
use crate::tensor::Tensor;

fn write(t: &Tensor, vals: Vec<f64>) -> Result<()> {
    let src = Tensor::from_vec(vals, &t.shape())?;
    no_grad(|| t.copy_(&src).map(|_| ()))
}

/// `uniform_(t, a, b)`.
pub fn uniform_(t: &Tensor, a: f64, b: f64) -> Result<()> {
    write(t, random::uniform_vec(t.numel(), a, b))
}

/// `normal_(t, mean, std)`.
pub fn normal_(t: &Tensor, mean: f64, std: f64) -> Result<()> {
    write(t, random::normal_vec(t.numel(), mean, std))
}

/// `constant_(t, val)`.
pub fn constant_(t: &Tensor, val: f64) -> Result<()> {
    no_grad(|| t.fill_(val).map(|_| ()))
}

pub fn zeros_(t: &Tensor) -> Result<()> {
    constant_(t, 0.0)
}

pub fn ones_(t: &Tensor) -> Result<()> {
    constant_(t, 1.0)
}

/// `calculate_gain(nonlinearity, param)`: linear/conv*/sigmoid 1, tanh 5/3,
/// relu sqrt(2), leaky_relu sqrt(2/(1+slope^2)) (slope defaults to 0.01),
/// selu 3/4.
pub fn calculate_gain(nonlinearity: &str, param: Option<f64>) -> Result<f64> {
    Ok(match nonlinearity {
        "linear" | "conv1d" | "conv2d" | "conv3d" | "conv_transpose1d" | "conv_transpose2d"
        | "conv_transpose3d" | "sigmoid" => 1.0,
        "tanh" => 5.0 / 3.0,
        "relu" => 2f64.sqrt(),
        "leaky_relu" => {
            let slope = param.unwrap_or(0.01);
            (2.0 / (1.0 + slope * slope)).sqrt()
        }
        "selu" => 3.0 / 4.0,
        other => {
            return Err(Error::op(
                "calculate_gain",
                format!("Unsupported nonlinearity {other}"),
            ))
        }
    })
}

/// `_calculate_fan_in_and_fan_out(t)`: (size(1) * receptive, size(0) * receptive).
pub fn calculate_fan_in_and_fan_out(t: &Tensor) -> Result<(usize, usize)> {
    let s = t.shape();
    if s.len() < 2 {
        return Err(Error::op(
            "init",
            "Fan in and fan out can not be computed for tensor with fewer than 2 dimensions",
        ));
    }
    let receptive: usize = s[2..].iter().product();
    Ok((s[1] * receptive, s[0] * receptive))
}

/// Which fan `kaiming_*` scales by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FanMode {
    FanIn,
    FanOut,
}

fn kaiming_std(t: &Tensor, a: f64, mode: FanMode, nonlinearity: &str) -> Result<f64> {
    let (fan_in, fan_out) = calculate_fan_in_and_fan_out(t)?;
    let fan = match mode {
        FanMode::FanIn => fan_in,
        FanMode::FanOut => fan_out,
    };
    let gain = calculate_gain(nonlinearity, Some(a))?;
    Ok(gain / (fan as f64).sqrt())
}

/// `kaiming_uniform_(t, a, mode, nonlinearity)`: U(-b, b), b = gain * sqrt(3 / fan).
/// PyTorch's defaults are a = 0, FanIn, "leaky_relu". A tensor with a zero
/// dimension is left as is.
pub fn kaiming_uniform_(t: &Tensor, a: f64, mode: FanMode, nonlinearity: &str) -> Result<()> {
    if t.shape().contains(&0) {
        return Ok(());
    }
    let bound = 3f64.sqrt() * kaiming_std(t, a, mode, nonlinearity)?;
    uniform_(t, -bound, bound)
}

/// `kaiming_normal_(t, a, mode, nonlinearity)`: N(0, gain / sqrt(fan)).
pub fn kaiming_normal_(t: &Tensor, a: f64, mode: FanMode, nonlinearity: &str) -> Result<()> {
    if t.shape().contains(&0) {
        return Ok(());
    }
    let std = kaiming_std(t, a, mode, nonlinearity)?;
    normal_(t, 0.0, std)
}

/// `xavier_uniform_(t, gain)`: U(-a, a), a = gain * sqrt(6 / (fan_in + fan_out)).
pub fn xavier_uniform_(t: &Tensor, gain: f64) -> Result<()> {
    let (fan_in, fan_out) = calculate_fan_in_and_fan_out(t)?;
    let std = gain * (2.0 / (fan_in + fan_out) as f64).sqrt();
    let a = 3f64.sqrt() * std;
    uniform_(t, -a, a)
}

/// `xavier_normal_(t, gain)`: N(0, gain * sqrt(2 / (fan_in + fan_out))).
pub fn xavier_normal_(t: &Tensor, gain: f64) -> Result<()> {
    let (fan_in, fan_out) = calculate_fan_in_and_fan_out(t)?;
    let std = gain * (2.0 / (fan_in + fan_out) as f64).sqrt();
    normal_(t, 0.0, std)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::DType;

    #[test]
    fn gains_and_fans() {
        // torch.nn.init.calculate_gain('leaky_relu', math.sqrt(5)) == sqrt(2/6)
        assert!(
            (calculate_gain("leaky_relu", Some(5f64.sqrt())).unwrap() - (1.0f64 / 3.0).sqrt())
                .abs()
                < 1e-15
        );
        assert_eq!(calculate_gain("tanh", None).unwrap(), 5.0 / 3.0);
        assert!(calculate_gain("nope", None).is_err());
        let w = Tensor::zeros(&[16, 3, 5, 5], DType::F32);
        assert_eq!(calculate_fan_in_and_fan_out(&w).unwrap(), (75, 400));
        assert!(calculate_fan_in_and_fan_out(&Tensor::zeros(&[3], DType::F32)).is_err());
    }

    #[test]
    fn kaiming_uniform_bound_and_identity() {
        crate::manual_seed(3);
        let w = Tensor::zeros(&[64, 100], DType::F32)
            .requires_grad_(true)
            .unwrap();
        let id = w.id();
        kaiming_uniform_(&w, 5f64.sqrt(), FanMode::FanIn, "leaky_relu").unwrap();
        // Linear's default: bound = 1/sqrt(fan_in) = 0.1
        let v = w.to_vec_f32();
        assert!(v.iter().all(|x| x.abs() <= 0.1));
        assert!(v.iter().any(|x| x.abs() > 0.09));
        assert_eq!(w.id(), id);
        assert!(w.requires_grad());
        ones_(&w).unwrap();
        assert!(w.to_vec_f32().iter().all(|&x| x == 1.0));
    }
}
