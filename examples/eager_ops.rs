//! Per-op eager cost at the zoo's shapes where kiln trailed PyTorch eager:
//! 25th-percentile microseconds (robust to a loaded machine) of each op of simple_net, pointwise_chain,
//! transformer_block, net_with_dropout, custom_stack and complex_net, in the
//! order `python/eager_ops.py` times the same ops in PyTorch (no_grad, eval).
//!
//! Run: `cargo run --release --example eager_ops -- [--threads N] [FILTER]`

use kiln::nn::prelude::*;
use kiln::ops::linalg::linear;
use kiln::{DType, Tensor};
use std::sync::Arc;
use std::time::Instant;

/// One timed op: its label and a closure running it.
type Op = (&'static str, Box<dyn Fn() -> kiln::Result<Tensor>>);

fn us(mut f: impl FnMut() -> kiln::Result<Tensor>) -> f64 {
    let t0 = Instant::now();
    let mut n = 0;
    while n < 20 || t0.elapsed().as_secs_f64() < 0.05 {
        std::hint::black_box(f().expect("op"));
        n += 1;
    }
    let mut t: Vec<f64> = Vec::new();
    let t0 = Instant::now();
    while t.len() < 30 || t0.elapsed().as_secs_f64() < 0.3 {
        let s = Instant::now();
        std::hint::black_box(f().expect("op"));
        t.push(s.elapsed().as_secs_f64() * 1e6);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 4]
}

fn main() -> kiln::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut filter = String::new();
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--threads" {
            let n: usize = args[i + 1].parse().expect("threads");
            rayon::ThreadPoolBuilder::new()
                .num_threads(n)
                .build_global()
                .expect("pool");
            i += 2;
        } else {
            filter = args[i].clone();
            i += 1;
        }
    }
    let r = |s: &[usize]| Tensor::randn(s, DType::F32);
    let lin = |i: usize, o: usize| (r(&[o, i]), r(&[o]));
    let ops: Vec<Op> = {
        let x = r(&[64, 784]);
        let (w1, b1) = lin(784, 256);
        let h = r(&[64, 256]);
        let (w2, b2) = lin(256, 10);
        let p = r(&[64, 1024]);
        let s = r(&[1024]);
        let xt = r(&[2, 16, 256]);
        let ln = Arc::new(LayerNorm::new(&[256])?);
        let (wq, bq) = lin(256, 768);
        let qkv = r(&[2, 16, 768])
            .view(&[2, 16, 3, 4, 64])?
            .permute(&[2, 0, 3, 1, 4])?;
        let att = r(&[2, 4, 16, 16]);
        let (wm, bm) = lin(256, 1024);
        let hm = r(&[2, 16, 1024]);
        let (wp, bp) = lin(1024, 256);
        let xl = r(&[8, 128, 256]);
        let qkvl = r(&[8, 128, 768])
            .view(&[8, 128, 3, 4, 64])?
            .permute(&[2, 0, 3, 1, 4])?;
        let attl = r(&[8, 4, 128, 128]);
        let hml = r(&[8, 128, 1024]);
        let yl = r(&[8, 4, 128, 64]);
        let xd = r(&[8192, 20]);
        let (wd1, bd1) = lin(20, 50);
        let hd = r(&[8192, 50]);
        let bn = BatchNorm1d::new(50)?;
        bn.eval();
        let (wd2, bd2) = lin(50, 2);
        let (wc2, bc2) = lin(50, 4);
        let v50 = r(&[50]);
        let xc = r(&[1024, 3, 10, 10]);
        let c1 = Conv2d::new(3, 16, 3)?;
        let hc1 = r(&[1024, 16, 8, 8]);
        let c2 = Conv2d::new(16, 32, 3)?;
        let hc2 = r(&[1024, 1152]);
        let (wf, bf) = lin(1152, 10);
        let hc3 = r(&[1024, 32, 6, 6]);
        vec![
            (
                "sn linear 64x784->256",
                Box::new(move || linear(&x, &w1, Some(&b1))),
            ),
            (
                "sn relu 64x256",
                Box::new({
                    let h = h.clone();
                    move || h.relu()
                }),
            ),
            (
                "sn linear 64x256->10",
                Box::new(move || linear(&h, &w2, Some(&b2))),
            ),
            (
                "pc mul [64,1024]*[1024]",
                Box::new({
                    let (p, s) = (p.clone(), s.clone());
                    move || p.mul(&s)
                }),
            ),
            (
                "pc add [64,1024]+[64,1024]",
                Box::new({
                    let p = p.clone();
                    move || p.add(&p)
                }),
            ),
            (
                "pc gelu 64x1024",
                Box::new({
                    let p = p.clone();
                    move || p.gelu()
                }),
            ),
            (
                "pc sigmoid 64x1024",
                Box::new({
                    let p = p.clone();
                    move || p.sigmoid()
                }),
            ),
            (
                "pc tanh 64x1024",
                Box::new({
                    let p = p.clone();
                    move || p.tanh()
                }),
            ),
            (
                "pc exp 64x1024",
                Box::new({
                    let p = p.clone();
                    move || p.exp()
                }),
            ),
            (
                "pc abs 64x1024",
                Box::new({
                    let p = p.clone();
                    move || p.abs()
                }),
            ),
            (
                "pc mul_scalar 64x1024",
                Box::new({
                    let p = p.clone();
                    move || p.mul_scalar(0.5)
                }),
            ),
            (
                "pc relu 64x1024",
                Box::new({
                    let p = p.clone();
                    move || p.relu()
                }),
            ),
            (
                "pc sqrt 64x1024",
                Box::new({
                    let p = p.clone();
                    move || p.sqrt()
                }),
            ),
            (
                "tb layer_norm 2x16x256",
                Box::new({
                    let (ln, xt) = (ln.clone(), xt.clone());
                    move || ln.call(&xt)
                }),
            ),
            (
                "tb linear 32x256->768",
                Box::new({
                    let xt = xt.clone();
                    move || linear(&xt, &wq, Some(&bq))
                }),
            ),
            (
                "tb q@kT 2x4x16x64",
                Box::new({
                    let qkv = qkv.clone();
                    move || {
                        qkv.select(0, 0)?
                            .matmul(&qkv.select(0, 1)?.transpose(-2, -1)?)
                    }
                }),
            ),
            (
                "tb softmax 2x4x16x16",
                Box::new({
                    let att = att.clone();
                    move || att.softmax(-1)
                }),
            ),
            (
                "tb att@v",
                Box::new({
                    let (att, qkv) = (att.clone(), qkv.clone());
                    move || att.matmul(&qkv.select(0, 2)?)
                }),
            ),
            (
                "tb transpose+reshape 2x4x16x64",
                Box::new({
                    let y = r(&[2, 4, 16, 64]);
                    move || y.transpose(1, 2)?.reshape(&[2, 16, 256])
                }),
            ),
            (
                "tb add 2x16x256",
                Box::new({
                    let xt = xt.clone();
                    move || xt.add(&xt)
                }),
            ),
            (
                "tb linear 32x256->1024",
                Box::new({
                    let (xt, wm, bm) = (xt.clone(), wm.clone(), bm.clone());
                    move || linear(&xt, &wm, Some(&bm))
                }),
            ),
            (
                "tb gelu 2x16x1024",
                Box::new({
                    let hm = hm.clone();
                    move || hm.gelu()
                }),
            ),
            (
                "tb linear 32x1024->256",
                Box::new({
                    let (hm, wp, bp) = (hm.clone(), wp.clone(), bp.clone());
                    move || linear(&hm, &wp, Some(&bp))
                }),
            ),
            (
                "TB layer_norm 8x128x256",
                Box::new({
                    let (ln, xl) = (ln.clone(), xl.clone());
                    move || ln.call(&xl)
                }),
            ),
            (
                "TB linear 1024x256->768",
                Box::new({
                    let xl = xl.clone();
                    let (wq, bq) = lin(256, 768);
                    move || linear(&xl, &wq, Some(&bq))
                }),
            ),
            (
                "TB q@kT 8x4x128x64",
                Box::new({
                    let qkvl = qkvl.clone();
                    move || {
                        qkvl.select(0, 0)?
                            .matmul(&qkvl.select(0, 1)?.transpose(-2, -1)?)
                    }
                }),
            ),
            (
                "TB mul_scalar 8x4x128x128",
                Box::new({
                    let attl = attl.clone();
                    move || attl.mul_scalar(0.125)
                }),
            ),
            (
                "TB softmax 8x4x128x128",
                Box::new({
                    let attl = attl.clone();
                    move || attl.softmax(-1)
                }),
            ),
            (
                "TB att@v",
                Box::new({
                    let (attl, qkvl) = (attl.clone(), qkvl.clone());
                    move || attl.matmul(&qkvl.select(0, 2)?)
                }),
            ),
            (
                "TB transpose+reshape",
                Box::new({
                    let yl = yl.clone();
                    move || yl.transpose(1, 2)?.reshape(&[8, 128, 256])
                }),
            ),
            (
                "TB linear 1024x256->256",
                Box::new({
                    let xl = xl.clone();
                    let (w, b) = lin(256, 256);
                    move || linear(&xl, &w, Some(&b))
                }),
            ),
            (
                "TB add 8x128x256",
                Box::new({
                    let xl = xl.clone();
                    move || xl.add(&xl)
                }),
            ),
            (
                "TB linear 1024x256->1024",
                Box::new({
                    let xl = xl.clone();
                    move || linear(&xl, &wm, Some(&bm))
                }),
            ),
            (
                "TB gelu 8x128x1024",
                Box::new({
                    let hml = hml.clone();
                    move || hml.gelu()
                }),
            ),
            (
                "TB linear 1024x1024->256",
                Box::new({
                    let hml = hml.clone();
                    move || linear(&hml, &wp, Some(&bp))
                }),
            ),
            (
                "nd linear 8192x20->50",
                Box::new({
                    let (xd, w, b) = (xd.clone(), wd1.clone(), bd1.clone());
                    move || linear(&xd, &w, Some(&b))
                }),
            ),
            (
                "nd batchnorm1d eval 8192x50",
                Box::new({
                    let hd = hd.clone();
                    move || bn.call(&hd)
                }),
            ),
            (
                "nd relu 8192x50",
                Box::new({
                    let hd = hd.clone();
                    move || hd.relu()
                }),
            ),
            (
                "nd linear 8192x50->2",
                Box::new({
                    let hd = hd.clone();
                    move || linear(&hd, &wd2, Some(&bd2))
                }),
            ),
            (
                "cs matmul 8192x20 @ w.t()",
                Box::new({
                    let xd = xd.clone();
                    move || xd.matmul(&wd1.t()?)
                }),
            ),
            (
                "cs add [8192,50]+[50]",
                Box::new({
                    let (hd, v) = (hd.clone(), v50.clone());
                    move || hd.add(&v)
                }),
            ),
            (
                "cs sub [8192,50]-[50]",
                Box::new({
                    let (hd, v) = (hd.clone(), v50.clone());
                    move || hd.sub(&v)
                }),
            ),
            (
                "cs div [8192,50]/[50]",
                Box::new({
                    let (hd, v) = (hd.clone(), v50.clone());
                    move || hd.div(&v)
                }),
            ),
            (
                "cs mul [50]*[8192,50]",
                Box::new({
                    let (hd, v) = (hd.clone(), v50.clone());
                    move || v.mul(&hd)
                }),
            ),
            (
                "cs leaky_relu 8192x50",
                Box::new({
                    let hd = hd.clone();
                    move || hd.leaky_relu(0.01)
                }),
            ),
            (
                "cs matmul 8192x50 @ w.t() (4)",
                Box::new({
                    let hd = hd.clone();
                    move || hd.matmul(&wc2.t()?)
                }),
            ),
            (
                "cs add [8192,4]+[4]",
                Box::new({
                    let (y, b) = (r(&[8192, 4]), bc2.clone());
                    move || y.add(&b)
                }),
            ),
            (
                "cs sigmoid 8192x4",
                Box::new({
                    let y = r(&[8192, 4]);
                    move || y.sigmoid()
                }),
            ),
            ("cn conv 3->16 1024x3x10x10", Box::new(move || c1.call(&xc))),
            (
                "cn relu 1024x16x8x8",
                Box::new({
                    let h = hc1.clone();
                    move || h.relu()
                }),
            ),
            (
                "cn conv 16->32",
                Box::new({
                    let h = hc1.clone();
                    move || c2.call(&h)
                }),
            ),
            (
                "cn relu 1024x32x6x6",
                Box::new({
                    let h = hc3.clone();
                    move || h.relu()
                }),
            ),
            (
                "cn linear 1024x1152->10",
                Box::new(move || linear(&hc2, &wf, Some(&bf))),
            ),
        ]
    };
    println!("| op | kiln us |\n|---|---|");
    kiln::no_grad(|| {
        for (name, f) in &ops {
            if name.contains(filter.as_str()) {
                println!("| {name} | {:.2} |", us(f));
            }
        }
    });
    Ok(())
}
