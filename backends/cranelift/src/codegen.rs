//! Cranelift IR for one pointwise kernel: a function
//! `fn(ins: *const *const f32, outs: *const *mut f32, start: u64, end: u64)`
//! with an f32x4 loop over `[start, end)` (start a multiple of 4) and a
//! scalar tail. Every op is emitted once for `f32x4` and once for `f32` by
//! the same code (`Em`), so both loops compute bit-identical results.
//!
//! Transcendentals are ports of kiln-cpu's `fastmath` (same constants, same
//! operation order; their Horner polynomials use fused multiply-add where
//! the host has FMA, which only removes roundings), so they carry its tested
//! error bounds against f64 libm over [-20, 20] and the extremes:
//! exp, sigmoid, tanh within 3 ulp relative (tanh within 2e-7 absolute near
//! 0, where it uses its odd polynomial); erf within 2e-7 absolute; gelu
//! within 2e-7 * max(1, |x|) absolute, gelu_tanh within 3e-7 * max(1, |x|).
//! NaN propagates; exp saturates to +inf above 88.72 and to 0 below -103.9.
//! The tests in `tests.rs` check these bounds on the JIT code itself, with
//! and without FMA.

use crate::{CompileError, InputAccess, KernelInput};
use cranelift_codegen::ir::condcodes::{FloatCC, IntCC};
use cranelift_codegen::ir::types::{F32, F32X4, I32, I32X4, I64};
use cranelift_codegen::ir::{
    AbiParam, Block, ConstantData, Endianness, InstBuilder, MemFlagsData, SigRef, StackSlotData,
    StackSlotKind, Type, UserFuncName, Value as CV,
};
use cranelift_codegen::isa::OwnedTargetIsa;
use cranelift_codegen::settings::{self, Configurable};
use cranelift_frontend::{FunctionBuilder, FunctionBuilderContext};
use cranelift_jit::{JITBuilder, JITModule};
use cranelift_module::{default_libcall_names, Linkage, Module};
use kiln_cpu::fastmath::{sqrt_tile_fn, tile_fn, FastFn, TileFn};
use kiln_ir::{BinaryOp, DType, Graph, Kernel, NodeId, Op, UnaryOp, Value};
use std::collections::HashMap;
use std::sync::OnceLock;

pub(crate) type KernelFn = unsafe extern "C" fn(*const *const f32, *const *mut f32, u64, u64);

/// A kernel value inside the loop body: f32 data or a comparison mask.
#[derive(Clone, Copy)]
enum V {
    F(CV),
    M(CV),
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

fn flags() -> MemFlagsData {
    // Not `aligned`: slices are only 4-byte aligned.
    MemFlagsData::new().with_notrap()
}

fn bc_flags() -> MemFlagsData {
    MemFlagsData::new().with_endianness(Endianness::Little)
}

/// Emits ops for one lane width.
struct Em<'a, 'b> {
    b: &'a mut FunctionBuilder<'b>,
    vec: bool,
    /// Polynomials use fused multiply-add (the host has FMA; cranelift-native
    /// enables it in the ISA flags then).
    fma: bool,
}

fn host_has_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Em<'_, '_> {
    fn fty(&self) -> Type {
        if self.vec {
            F32X4
        } else {
            F32
        }
    }
    fn ity(&self) -> Type {
        if self.vec {
            I32X4
        } else {
            I32
        }
    }
    fn fc(&mut self, x: f32) -> CV {
        let c = self.b.ins().f32const(x);
        if self.vec {
            self.b.ins().splat(F32X4, c)
        } else {
            c
        }
    }
    fn ic(&mut self, x: i32) -> CV {
        let c = self.b.ins().iconst(I32, x as i64);
        if self.vec {
            self.b.ins().splat(I32X4, c)
        } else {
            c
        }
    }
    fn add(&mut self, a: CV, b: CV) -> CV {
        self.b.ins().fadd(a, b)
    }
    fn sub(&mut self, a: CV, b: CV) -> CV {
        self.b.ins().fsub(a, b)
    }
    fn mul(&mut self, a: CV, b: CV) -> CV {
        self.b.ins().fmul(a, b)
    }
    fn div(&mut self, a: CV, b: CV) -> CV {
        self.b.ins().fdiv(a, b)
    }
    /// a * b + c, fused where FMA is enabled.
    fn madd(&mut self, a: CV, b: CV, c: CV) -> CV {
        if self.fma {
            self.b.ins().fma(a, b, c)
        } else {
            let t = self.mul(a, b);
            self.add(t, c)
        }
    }
    fn addc(&mut self, a: CV, c: f32) -> CV {
        let c = self.fc(c);
        self.add(a, c)
    }
    fn mulc(&mut self, a: CV, c: f32) -> CV {
        let c = self.fc(c);
        self.mul(a, c)
    }
    fn cmp(&mut self, cc: FloatCC, a: CV, b: CV) -> CV {
        self.b.ins().fcmp(cc, a, b)
    }
    fn cmpc(&mut self, cc: FloatCC, a: CV, c: f32) -> CV {
        let c = self.fc(c);
        self.cmp(cc, a, c)
    }
    /// `m ? a : b` for a mask from `cmp`.
    fn sel(&mut self, m: CV, a: CV, b: CV) -> CV {
        if self.vec {
            let mf = self.b.ins().bitcast(F32X4, bc_flags(), m);
            self.b.ins().bitselect(mf, a, b)
        } else {
            self.b.ins().select(m, a, b)
        }
    }
    fn as_bits(&mut self, x: CV) -> CV {
        let t = self.ity();
        self.b.ins().bitcast(t, bc_flags(), x)
    }
    fn bits_as_f(&mut self, x: CV) -> CV {
        let t = self.fty();
        self.b.ins().bitcast(t, bc_flags(), x)
    }
    /// Horner: c[0] * x^(n-1) + ... + c[n-1].
    fn poly(&mut self, x: CV, c: &[f32]) -> CV {
        let mut p = self.fc(c[0]);
        for &k in &c[1..] {
            if self.fma {
                let kc = self.fc(k);
                p = self.b.ins().fma(p, x, kc);
            } else {
                p = self.mul(p, x);
                p = self.addc(p, k);
            }
        }
        p
    }

    fn exp(&mut self, x: CV) -> CV {
        // Clamp to [-104, 88.73] with compare + select (cheaper than x64's
        // NaN-exact fmin/fmax sequences); NaN compares false and stays NaN.
        let lo = self.fc(-104.0);
        let hi = self.fc(88.73);
        let m = self.cmp(FloatCC::GreaterThan, x, hi);
        let x = self.sel(m, hi, x);
        let m = self.cmp(FloatCC::LessThan, x, lo);
        let x = self.sel(m, lo, x);
        let l2e = self.fc(LOG2E);
        let magic = self.fc(ROUND_MAGIC);
        let y = self.madd(x, l2e, magic);
        let n = self.sub(y, magic);
        let yb = self.as_bits(y);
        let mb = self.ic(ROUND_MAGIC.to_bits() as i32);
        let ni = self.b.ins().isub(yb, mb);
        let nn = self.b.ins().fneg(n);
        let c = self.fc(LN2_HI);
        let r = self.madd(nn, c, x);
        let c = self.fc(LN2_LO);
        let r = self.madd(nn, c, r);
        let p = self.poly(
            r,
            &[
                1.987_569_1e-4,
                1.398_2e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                0.5,
            ],
        );
        let p = self.mul(p, r);
        let e = self.madd(p, r, r);
        let e = self.addc(e, 1.0);
        let one = self.b.ins().iconst(I32, 1);
        let n1 = self.b.ins().sshr(ni, one);
        let n2 = self.b.ins().isub(ni, n1);
        let bias = self.ic(127);
        let sh = self.b.ins().iconst(I32, 23);
        let s1 = self.b.ins().iadd(n1, bias);
        let s1 = self.b.ins().ishl(s1, sh);
        let s1 = self.bits_as_f(s1);
        let s2 = self.b.ins().iadd(n2, bias);
        let s2 = self.b.ins().ishl(s2, sh);
        let s2 = self.bits_as_f(s2);
        let e = self.mul(e, s1);
        self.mul(e, s2)
    }

    fn sigmoid(&mut self, x: CV) -> CV {
        let nx = self.b.ins().fneg(x);
        let e = self.exp(nx);
        let d = self.addc(e, 1.0);
        let one = self.fc(1.0);
        self.div(one, d)
    }

    fn tanh(&mut self, x: CV) -> CV {
        let a = self.b.ins().fabs(x);
        let z = self.mul(x, x);
        let p = self.poly(
            z,
            &[
                -5.704_988_7e-3,
                2.063_909e-2,
                -5.373_971_6e-2,
                1.333_144_2e-1,
                -0.333_332_8,
            ],
        );
        let pz = self.mul(p, z);
        let small = self.madd(pz, x, x);
        let a2 = self.mulc(a, 2.0);
        let e = self.exp(a2);
        let d = self.addc(e, 1.0);
        let two = self.fc(2.0);
        let q = self.div(two, d);
        let one = self.fc(1.0);
        let big = self.sub(one, q);
        let neg = self.cmpc(FloatCC::LessThan, x, 0.0);
        let nbig = self.b.ins().fneg(big);
        let big = self.sel(neg, nbig, big);
        let is_small = self.cmpc(FloatCC::LessThan, a, 0.625);
        self.sel(is_small, small, big)
    }

    fn erf(&mut self, x: CV) -> CV {
        let a = self.b.ins().fabs(x);
        let z = self.mul(x, x);
        let p = self.poly(
            z,
            &[
                -1.0 / 1320.0,
                1.0 / 216.0,
                -1.0 / 42.0,
                1.0 / 10.0,
                -1.0 / 3.0,
            ],
        );
        let pz = self.mul(p, z);
        let small = self.madd(pz, x, x);
        let small = self.mulc(small, std::f32::consts::FRAC_2_SQRT_PI);
        let h = self.mulc(a, 0.5);
        let h = self.addc(h, 1.0);
        let one = self.fc(1.0);
        let t = self.div(one, h);
        let q = self.poly(
            t,
            &[
                0.170_872_77,
                -0.822_152_23,
                1.488_515_9,
                -1.135_204,
                0.278_868_07,
                -0.186_288_06,
                0.096_784_18,
                0.374_091_96,
                1.000_023_7,
                -1.265_512_2,
            ],
        );
        let q = self.sub(q, z);
        let e = self.exp(q);
        let te = self.mul(t, e);
        let one = self.fc(1.0);
        let big = self.sub(one, te);
        let neg = self.cmpc(FloatCC::LessThan, x, 0.0);
        let nbig = self.b.ins().fneg(big);
        let big = self.sel(neg, nbig, big);
        let is_small = self.cmpc(FloatCC::LessThan, a, 0.5);
        self.sel(is_small, small, big)
    }

    fn gelu(&mut self, x: CV) -> CV {
        let u = self.mulc(x, std::f32::consts::FRAC_1_SQRT_2);
        let e = self.erf(u);
        let e = self.addc(e, 1.0);
        let h = self.mulc(x, 0.5);
        self.mul(h, e)
    }

    fn gelu_tanh(&mut self, x: CV) -> CV {
        let k = self.mulc(x, 0.044_715);
        let k = self.mul(k, x);
        let k = self.mul(k, x);
        let inner = self.add(x, k);
        let inner = self.mulc(inner, 0.797_884_6);
        let t = self.tanh(inner);
        let t = self.addc(t, 1.0);
        let h = self.mulc(x, 0.5);
        self.mul(h, t)
    }

    fn unary(&mut self, u: UnaryOp, x: CV) -> Option<CV> {
        use UnaryOp::*;
        Some(match u {
            Neg => self.b.ins().fneg(x),
            Abs => self.b.ins().fabs(x),
            Exp => self.exp(x),
            Sqrt => self.b.ins().sqrt(x),
            Rsqrt => {
                let s = self.b.ins().sqrt(x);
                let one = self.fc(1.0);
                self.div(one, s)
            }
            Tanh => self.tanh(x),
            Sigmoid => self.sigmoid(x),
            // x <= 0 ? +0 : x: relu(-0) = +0 and relu(NaN) = NaN.
            Relu => {
                let z = self.fc(0.0);
                let m = self.cmp(FloatCC::LessThanOrEqual, x, z);
                self.sel(m, z, x)
            }
            LeakyRelu(s) => {
                let m = self.cmpc(FloatCC::GreaterThan, x, 0.0);
                let xs = self.mulc(x, s as f32);
                self.sel(m, x, xs)
            }
            GeluErf => self.gelu(x),
            GeluTanh => self.gelu_tanh(x),
            Erf => self.erf(x),
            // `x < lo ? lo : x`, then `y > hi ? hi : y`: NaN passes through.
            Clamp(lo, hi) => {
                let mut y = x;
                if let Some(lo) = lo {
                    let m = self.cmpc(FloatCC::LessThan, y, lo as f32);
                    let c = self.fc(lo as f32);
                    y = self.sel(m, c, y);
                }
                if let Some(hi) = hi {
                    let m = self.cmpc(FloatCC::GreaterThan, y, hi as f32);
                    let c = self.fc(hi as f32);
                    y = self.sel(m, c, y);
                }
                y
            }
            PowScalar(1.0) => x,
            PowScalar(2.0) => self.mul(x, x),
            // powf(x, 0.5): sqrt, but +0 for -0 and +inf for -inf.
            PowScalar(0.5) => {
                let s = self.b.ins().sqrt(x);
                let s = self.addc(s, 0.0);
                let m = self.cmpc(FloatCC::Equal, x, f32::NEG_INFINITY);
                let inf = self.fc(f32::INFINITY);
                self.sel(m, inf, s)
            }
            AddScalar(s) => self.addc(x, s as f32),
            MulScalar(s) => self.mulc(x, s as f32),
            RSubScalar(s) => {
                let c = self.fc(s as f32);
                self.sub(c, x)
            }
            RDivScalar(s) => {
                let c = self.fc(s as f32);
                self.div(c, x)
            }
            Square => self.mul(x, x),
            Reciprocal => {
                let one = self.fc(1.0);
                self.div(one, x)
            }
            Sign => {
                let gt = self.cmpc(FloatCC::GreaterThan, x, 0.0);
                let lt = self.cmpc(FloatCC::LessThan, x, 0.0);
                let one = self.fc(1.0);
                let mone = self.fc(-1.0);
                let y = self.sel(lt, mone, x);
                self.sel(gt, one, y)
            }
            Step => {
                let gt = self.cmpc(FloatCC::GreaterThan, x, 0.0);
                let one = self.fc(1.0);
                let z = self.fc(0.0);
                self.sel(gt, one, z)
            }
            _ => return None,
        })
    }

    fn binary(&mut self, op: BinaryOp, x: CV, y: CV) -> Option<V> {
        use BinaryOp::*;
        let cc = |c| Some(c);
        let cmp = match op {
            Eq => cc(FloatCC::Equal),
            Ne => cc(FloatCC::NotEqual),
            Lt => cc(FloatCC::LessThan),
            Le => cc(FloatCC::LessThanOrEqual),
            Gt => cc(FloatCC::GreaterThan),
            Ge => cc(FloatCC::GreaterThanOrEqual),
            _ => None,
        };
        if let Some(c) = cmp {
            return Some(V::M(self.cmp(c, x, y)));
        }
        Some(V::F(match op {
            Add => self.add(x, y),
            Sub => self.sub(x, y),
            Mul => self.mul(x, y),
            Div => self.div(x, y),
            Maximum => self.b.ins().fmax(x, y),
            Minimum => self.b.ins().fmin(x, y),
            _ => return None,
        }))
    }
}

fn unsupported(op: &str, dt: DType) -> CompileError {
    CompileError::new(op, format!("op {op} on {} not supported", dt.short_name()))
}

/// Estimated cost per output element, in units of about 0.12 ns of one
/// core on the measuring machine (relu: 2.2 units = 0.27 ns/element;
/// pointwise_chain: ~97 units = 11 ns/element; see bench_pointwise.rs).
pub(crate) fn cost_per_element(graph: &Graph, kernel: &Kernel, tiled: bool) -> usize {
    let mut c10 = 10 * (kernel.inputs.len() + kernel.outputs.len());
    for &n in &kernel.nodes {
        if tiled && tile_call(graph, n).is_some() {
            // A tile call: the AVX2/AVX-512 loop plus a store and a load.
            c10 += 60;
            continue;
        }
        c10 += match &graph.node(n).op {
            Op::Unary(UnaryOp::GeluErf | UnaryOp::GeluTanh) => 300,
            Op::Unary(UnaryOp::Exp | UnaryOp::Sigmoid | UnaryOp::Tanh | UnaryOp::Erf) => 200,
            Op::Unary(
                UnaryOp::Sqrt | UnaryOp::Rsqrt | UnaryOp::Reciprocal | UnaryOp::RDivScalar(_),
            )
            | Op::Binary(BinaryOp::Div) => 20,
            _ => 2,
        };
    }
    c10.div_ceil(10).max(1)
}

fn non_f32(tys: &[kiln_ir::TensorType]) -> Option<&kiln_ir::TensorType> {
    tys.iter().find(|t| t.dtype != DType::F32)
}

/// Checks that every node can be lowered (so errors come before any IR).
fn check(graph: &Graph, kernel: &Kernel) -> Result<(), CompileError> {
    for &n in &kernel.nodes {
        let node = graph.node(n);
        let name = node.op.name();
        let tys = graph.operand_types(n);
        let out = node.outputs[0].dtype;
        match &node.op {
            Op::Unary(u) => {
                if let Some(t) = non_f32(&tys) {
                    return Err(unsupported(name, t.dtype));
                }
                let ok = !matches!(
                    u,
                    UnaryOp::Log | UnaryOp::Sin | UnaryOp::Cos | UnaryOp::RPowScalar(_)
                ) && match u {
                    UnaryOp::PowScalar(p) => [0.5, 1.0, 2.0].contains(p),
                    _ => true,
                };
                if !ok {
                    return Err(CompileError::new(
                        name,
                        match u {
                            UnaryOp::PowScalar(p) => {
                                format!("op {name} with exponent {p} on f32 not supported")
                            }
                            _ => format!("op {name} on f32 not supported"),
                        },
                    ));
                }
            }
            Op::Binary(b) => {
                if let Some(t) = non_f32(&tys) {
                    return Err(unsupported(name, t.dtype));
                }
                if *b == BinaryOp::Pow {
                    return Err(unsupported(name, DType::F32));
                }
            }
            Op::Where => {
                if let Some(t) = non_f32(&tys[1..]) {
                    return Err(unsupported(name, t.dtype));
                }
                if tys[0].dtype != DType::Bool || !kernel.nodes.contains(&graph.operands(n)[0].node)
                {
                    return Err(CompileError::new(
                        name,
                        "op where: the condition must be a comparison inside the kernel".into(),
                    ));
                }
            }
            Op::Cast(d) => {
                let from = tys[0].dtype;
                let internal_bool =
                    from == DType::Bool && kernel.nodes.contains(&graph.operands(n)[0].node);
                let ok =
                    matches!(*d, DType::F32 | DType::Bool) && (from == DType::F32 || internal_bool);
                if !ok {
                    return Err(CompileError::new(
                        name,
                        format!(
                            "op cast from {} to {} not supported",
                            from.short_name(),
                            d.short_name()
                        ),
                    ));
                }
            }
            _ => return Err(unsupported(name, out)),
        }
    }
    Ok(())
}

/// Emits the loop body for one lane width at flat index `i` (i64): loads
/// every input, evaluates every node, stores every output.
fn body(
    em: &mut Em,
    graph: &Graph,
    kernel: &Kernel,
    inputs: &[KernelInput],
    in_ptrs: &[CV],
    out_ptrs: &[CV],
    i: CV,
) {
    let mut env: HashMap<Value, V> = HashMap::new();
    for (j, d) in inputs.iter().enumerate() {
        let v = load_input(em, d, in_ptrs[j], i);
        env.insert(d.value, V::F(v));
    }
    for &n in &kernel.nodes {
        eval_node(em, graph, n, &mut env);
    }
    store_outputs(em, kernel, &env, out_ptrs, i);
}

fn store_outputs(em: &mut Em, kernel: &Kernel, env: &HashMap<Value, V>, out_ptrs: &[CV], i: CV) {
    for (k, v) in kernel.outputs.iter().enumerate() {
        let x = match env[v] {
            V::F(x) => x,
            V::M(_) => unreachable!("checked: f32 output"),
        };
        let off = em.b.ins().imul_imm_u(i, 4);
        let addr = em.b.ins().iadd(out_ptrs[k], off);
        em.b.ins().store(flags(), x, addr, 0);
    }
}

/// Loads input `d` (at `base`) for the lanes starting at flat index `i`.
fn load_input(em: &mut Em, d: &KernelInput, base: CV, i: CV) -> CV {
    let lanes = if em.vec { 4 } else { 1 };
    let fty = em.fty();
    let load_at = |em: &mut Em, idx: CV, ty: Type| {
        let off = em.b.ins().imul_imm_u(idx, 4);
        let addr = em.b.ins().iadd(base, off);
        em.b.ins().load(ty, flags(), addr, 0)
    };
    let splat = |em: &mut Em, s: CV| {
        if em.vec {
            em.b.ins().splat(F32X4, s)
        } else {
            s
        }
    };
    // (i / inner) % size, with shifts and masks for powers of two.
    let bidx = |em: &mut Em, i: CV, inner: usize, size: usize| {
        let q = if inner == 1 {
            i
        } else if inner.is_power_of_two() {
            em.b.ins().ushr_imm_u(i, inner.trailing_zeros() as i64)
        } else {
            em.b.ins().udiv_imm_u(i, inner as i64)
        };
        if size.is_power_of_two() {
            em.b.ins().band_imm_u(q, (size - 1) as i64)
        } else {
            em.b.ins().urem_imm_u(q, size as i64)
        }
    };
    let v = match d.access {
        InputAccess::Contiguous => load_at(em, i, fty),
        InputAccess::Scalar => {
            let s = em.b.ins().load(F32, flags(), base, 0);
            splat(em, s)
        }
        InputAccess::Broadcast { inner, size } => {
            if !em.vec {
                let idx = bidx(em, i, inner, size);
                load_at(em, idx, F32)
            } else if inner % 4 == 0 {
                // i is a multiple of 4: the 4 lanes share one element.
                let idx = bidx(em, i, inner, size);
                let s = load_at(em, idx, F32);
                splat(em, s)
            } else if inner == 1 && size % 4 == 0 {
                // 4 consecutive elements that do not wrap.
                let idx = bidx(em, i, 1, size);
                load_at(em, idx, F32X4)
            } else if inner == 1 && size >= 4 {
                // A trailing vector whose length is not a multiple of
                // 4: lanes idx0 + j, wrapping at most once.
                let idx0 = bidx(em, i, 1, size);
                let s = load_at(em, idx0, F32);
                let mut v = splat(em, s);
                for lane in 1..lanes {
                    let t = em.b.ins().iadd_imm_s(idx0, lane as i64);
                    let w =
                        em.b.ins()
                            .icmp_imm_u(IntCC::UnsignedGreaterThanOrEqual, t, size as i64);
                    let tw = em.b.ins().iadd_imm_s(t, -(size as i64));
                    let idx = em.b.ins().select(w, tw, t);
                    let s = load_at(em, idx, F32);
                    v = em.b.ins().insertlane(v, s, lane as u8);
                }
                v
            } else if inner > 4 && inner <= i32::MAX as usize {
                // The 4 lanes span at most two consecutive elements
                // c0, c1: lane j takes c1 when (i % inner) + j >= inner.
                let q = if inner.is_power_of_two() {
                    em.b.ins().ushr_imm_u(i, inner.trailing_zeros() as i64)
                } else {
                    em.b.ins().udiv_imm_u(i, inner as i64)
                };
                let qi = em.b.ins().imul_imm_u(q, inner as i64);
                let r = em.b.ins().isub(i, qi);
                let c0 = bidx(em, q, 1, size);
                let c1 = em.b.ins().iadd_imm_s(c0, 1);
                let wrap = em.b.ins().icmp_imm_u(IntCC::Equal, c1, size as i64);
                let zero = em.b.ins().iconst(I64, 0);
                let c1 = em.b.ins().select(wrap, zero, c1);
                let s0 = load_at(em, c0, F32);
                let s1 = load_at(em, c1, F32);
                let v0 = splat(em, s0);
                let v1 = splat(em, s1);
                let r32 = em.b.ins().ireduce(I32, r);
                let rv = em.b.ins().splat(I32X4, r32);
                let bytes: Vec<u8> = (0u32..4).flat_map(|j| j.to_le_bytes()).collect();
                let lanes_c = em.b.func.dfg.constants.insert(ConstantData::from(bytes));
                let lane_ids = em.b.ins().vconst(I32X4, lanes_c);
                let pos = em.b.ins().iadd(rv, lane_ids);
                let inner_v = em.ic(inner as i32);
                let m =
                    em.b.ins()
                        .icmp(IntCC::SignedGreaterThanOrEqual, pos, inner_v);
                em.sel(m, v1, v0)
            } else {
                let idx = bidx(em, i, inner, size);
                let s = load_at(em, idx, F32);
                let mut v = splat(em, s);
                for lane in 1..lanes {
                    let il = em.b.ins().iadd_imm_s(i, lane as i64);
                    let idx = bidx(em, il, inner, size);
                    let s = load_at(em, idx, F32);
                    v = em.b.ins().insertlane(v, s, lane as u8);
                }
                v
            }
        }
    };
    v
}

/// Evaluates node `n` on the values in `env` and records its result there.
fn eval_node(em: &mut Em, graph: &Graph, n: NodeId, env: &mut HashMap<Value, V>) {
    let node = graph.node(n);
    let ops: Vec<V> = graph.operands(n).iter().map(|v| env[v]).collect();
    let f = |v: V| match v {
        V::F(x) => x,
        V::M(_) => unreachable!("checked: float operand"),
    };
    let r = match &node.op {
        Op::Unary(u) => V::F(em.unary(*u, f(ops[0])).expect("checked: supported unary")),
        Op::Binary(b) => em
            .binary(*b, f(ops[0]), f(ops[1]))
            .expect("checked: supported binary"),
        Op::Where => match ops[0] {
            V::M(m) => V::F(em.sel(m, f(ops[1]), f(ops[2]))),
            V::F(_) => unreachable!("checked: mask condition"),
        },
        Op::Cast(d) => match (ops[0], *d) {
            (V::F(x), DType::F32) => V::F(x),
            (V::M(m), DType::Bool) => V::M(m),
            (V::M(m), _) => {
                let one = em.fc(1.0);
                let z = em.fc(0.0);
                V::F(em.sel(m, one, z))
            }
            (V::F(x), _) => V::M(em.cmpc(FloatCC::NotEqual, x, 0.0)),
        },
        _ => unreachable!("checked: pointwise op"),
    };
    env.insert(Value::new(n, 0), r);
}

/// Elements per tile of the tiled loop (one tile buffer is 1 KiB, and a
/// kernel's buffers stay in L1).
pub const TILE: usize = 256;

/// Most tile buffers a kernel may use (64 KiB of stack); larger kernels
/// are emitted without tiles.
const MAX_TILE_BUFS: usize = 64;

/// The tile routine that runs node `n` in the tiled loop, if `n` is a
/// transcendental op or sqrt (f32) and the CPU has AVX2 or AVX-512.
fn tile_call(graph: &Graph, n: NodeId) -> Option<TileFn> {
    let f = match graph.node(n).op {
        Op::Unary(UnaryOp::Exp) => FastFn::Exp,
        Op::Unary(UnaryOp::Sigmoid) => FastFn::Sigmoid,
        Op::Unary(UnaryOp::Tanh) => FastFn::Tanh,
        Op::Unary(UnaryOp::Erf) => FastFn::Erf,
        Op::Unary(UnaryOp::GeluErf) => FastFn::Gelu,
        Op::Unary(UnaryOp::GeluTanh) => FastFn::GeluTanh,
        // Exactly rounded either way; 16 lanes per instruction in the tile.
        Op::Unary(UnaryOp::Sqrt) => return sqrt_tile_fn(),
        _ => return None,
    };
    tile_fn(f)
}

/// Where a tile call reads its operand: a tile buffer, or a contiguous
/// kernel input read in place.
enum Src {
    Buf(Value),
    Input(usize),
}

/// One step of a tile: an inline f32x4 loop over the tile's elements, or
/// a call to a tile routine.
enum Seg {
    Inline {
        nodes: Vec<NodeId>,
        /// Values read from tile buffers (produced by earlier steps).
        reads: Vec<Value>,
        /// Values written to tile buffers for later steps.
        writes: Vec<Value>,
    },
    Call {
        node: NodeId,
        f: TileFn,
        src: Src,
    },
}

/// The tiled form of a kernel: steps run on each tile of [`TILE`]
/// elements in turn, values crossing steps held in tile buffers; the last
/// step is inline and stores every output (so an output that is the same
/// memory as an input is written only after every step has read the tile).
pub(crate) struct TilePlan {
    segs: Vec<Seg>,
    bufs: HashMap<Value, usize>,
}

pub(crate) fn plan_tiles(
    graph: &Graph,
    kernel: &Kernel,
    inputs: &[KernelInput],
) -> Option<TilePlan> {
    let input_of: HashMap<Value, usize> = inputs
        .iter()
        .enumerate()
        .map(|(j, d)| (d.value, j))
        .collect();
    let mut segs = Vec::new();
    let mut cur = Vec::new();
    for &n in &kernel.nodes {
        if let Some(f) = tile_call(graph, n) {
            segs.push(Seg::Inline {
                nodes: std::mem::take(&mut cur),
                reads: vec![],
                writes: vec![],
            });
            let v = graph.operands(n)[0];
            let src = match input_of.get(&v) {
                Some(&j) if inputs[j].access == InputAccess::Contiguous => Src::Input(j),
                _ => Src::Buf(v),
            };
            segs.push(Seg::Call { node: n, f, src });
        } else {
            cur.push(n);
        }
    }
    if segs.is_empty() {
        return None;
    }
    segs.push(Seg::Inline {
        nodes: cur,
        reads: vec![],
        writes: vec![],
    });
    let mut seg_of: HashMap<NodeId, usize> = HashMap::new();
    for (k, s) in segs.iter().enumerate() {
        match s {
            Seg::Inline { nodes, .. } => nodes.iter().for_each(|&n| {
                seg_of.insert(n, k);
            }),
            Seg::Call { node, .. } => {
                seg_of.insert(*node, k);
            }
        }
    }
    // Values each step needs from buffers, and who fills those buffers.
    let mut reads: Vec<Vec<Value>> = vec![vec![]; segs.len()];
    let mut writes: Vec<Vec<Value>> = vec![vec![]; segs.len()];
    let mut bufs: HashMap<Value, usize> = HashMap::new();
    let need = |v: Value,
                at: usize,
                reads: &mut Vec<Vec<Value>>,
                writes: &mut Vec<Vec<Value>>,
                bufs: &mut HashMap<Value, usize>| {
        let from = match seg_of.get(&v.node) {
            Some(&p) if p == at => return,
            Some(&p) => p,
            // A kernel input feeding a call: loaded and stored by the inline
            // step just before the call.
            None => at - 1,
        };
        if !bufs.contains_key(&v) {
            let b = bufs.len();
            bufs.insert(v, b);
            if matches!(segs[from], Seg::Inline { .. }) {
                writes[from].push(v);
            }
        }
        if matches!(segs[at], Seg::Inline { .. }) && !reads[at].contains(&v) {
            reads[at].push(v);
        }
    };
    let last = segs.len() - 1;
    for (k, s) in segs.iter().enumerate() {
        match s {
            Seg::Inline { nodes, .. } => {
                for &n in nodes {
                    for v in graph.operands(n) {
                        if !input_of.contains_key(&v) {
                            need(v, k, &mut reads, &mut writes, &mut bufs);
                        }
                    }
                }
            }
            Seg::Call { node, src, .. } => {
                if let Src::Buf(v) = src {
                    need(*v, k, &mut reads, &mut writes, &mut bufs);
                }
                let r = Value::new(*node, 0);
                if !bufs.contains_key(&r) {
                    bufs.insert(r, bufs.len());
                }
            }
        }
    }
    for &v in &kernel.outputs {
        if !input_of.contains_key(&v) {
            need(v, last, &mut reads, &mut writes, &mut bufs);
        }
    }
    if bufs.len() > MAX_TILE_BUFS {
        return None;
    }
    for (k, s) in segs.iter_mut().enumerate() {
        if let Seg::Inline {
            reads: r,
            writes: w,
            ..
        } = s
        {
            *r = std::mem::take(&mut reads[k]);
            *w = std::mem::take(&mut writes[k]);
        }
    }
    Some(TilePlan { segs, bufs })
}

/// Emits the tiled loop: from block `head(i0)` while `i0 + TILE <= end`,
/// each tile's steps; then jumps to `rest(i0)` (the f32x4 and scalar loops
/// for the remainder).
#[allow(clippy::too_many_arguments)]
fn emit_tiles(
    b: &mut FunctionBuilder,
    plan: &TilePlan,
    graph: &Graph,
    kernel: &Kernel,
    inputs: &[KernelInput],
    in_ptrs: &[CV],
    out_ptrs: &[CV],
    (head, end, rest): (Block, CV, Block),
    tile_sig: SigRef,
    ptr: Type,
    fma: bool,
) {
    let slot = b.create_sized_stack_slot(StackSlotData::new(
        StackSlotKind::ExplicitSlot,
        (plan.bufs.len().max(1) * TILE * 4) as u32,
        6,
    ));
    let tbody = b.create_block();
    b.append_block_param(tbody, I64);
    b.switch_to_block(head);
    let i0 = b.block_params(head)[0];
    let it = b.ins().iadd_imm_s(i0, TILE as i64);
    let c = b.ins().icmp(IntCC::UnsignedLessThanOrEqual, it, end);
    b.ins().brif(c, tbody, &[i0.into()], rest, &[i0.into()]);
    b.switch_to_block(tbody);
    let i0 = b.block_params(tbody)[0];
    let base = b.ins().stack_addr(ptr, slot, 0);
    let buf_at = |b: &mut FunctionBuilder, v: &Value| {
        b.ins().iadd_imm_s(base, (plan.bufs[v] * TILE * 4) as i64)
    };
    let last = plan.segs.len() - 1;
    for (k, seg) in plan.segs.iter().enumerate() {
        match seg {
            Seg::Call { node, f, src } => {
                let sp = match src {
                    Src::Buf(v) => buf_at(b, v),
                    Src::Input(j) => {
                        let off = b.ins().imul_imm_u(i0, 4);
                        b.ins().iadd(in_ptrs[*j], off)
                    }
                };
                let dp = buf_at(b, &Value::new(*node, 0));
                let fp = b.ins().iconst(ptr, *f as usize as i64);
                let n = b.ins().iconst(I64, TILE as i64);
                b.ins().call_indirect(tile_sig, fp, &[sp, dp, n]);
            }
            Seg::Inline {
                nodes,
                reads,
                writes,
            } => {
                if nodes.is_empty() && writes.is_empty() && k != last {
                    continue;
                }
                // A bottom-tested loop (a tile is never empty): one branch
                // per 4 elements.
                let lb = b.create_block();
                let after = b.create_block();
                b.append_block_param(lb, I64);
                let z = b.ins().iconst(I64, 0);
                b.ins().jump(lb, &[z.into()]);
                b.switch_to_block(lb);
                let j = b.block_params(lb)[0];
                let i = b.ins().iadd(i0, j);
                let joff = b.ins().imul_imm_u(j, 4);
                let mut env: HashMap<Value, V> = HashMap::new();
                {
                    let mut em = Em { b, vec: true, fma };
                    for v in reads {
                        let a = buf_at(em.b, v);
                        let a = em.b.ins().iadd(a, joff);
                        let x = em.b.ins().load(F32X4, flags(), a, 0);
                        let x = if graph.value_type(*v).dtype == DType::Bool {
                            V::M(em.b.ins().bitcast(I32X4, bc_flags(), x))
                        } else {
                            V::F(x)
                        };
                        env.insert(*v, x);
                    }
                    let mut wanted: Vec<Value> = nodes
                        .iter()
                        .flat_map(|&n| graph.operands(n))
                        .chain(writes.iter().copied())
                        .collect();
                    if k == last {
                        wanted.extend(kernel.outputs.iter().copied());
                    }
                    for (jx, d) in inputs.iter().enumerate() {
                        if wanted.contains(&d.value) && !env.contains_key(&d.value) {
                            let x = load_input(&mut em, d, in_ptrs[jx], i);
                            env.insert(d.value, V::F(x));
                        }
                    }
                    for &n in nodes {
                        eval_node(&mut em, graph, n, &mut env);
                    }
                    for v in writes {
                        let x = match env[v] {
                            V::F(x) => x,
                            V::M(m) => em.b.ins().bitcast(F32X4, bc_flags(), m),
                        };
                        let a = buf_at(em.b, v);
                        let a = em.b.ins().iadd(a, joff);
                        em.b.ins().store(flags(), x, a, 0);
                    }
                    if k == last {
                        store_outputs(&mut em, kernel, &env, out_ptrs, i);
                    }
                }
                let j4 = b.ins().iadd_imm_s(j, 4);
                let c = b.ins().icmp_imm_u(IntCC::UnsignedLessThan, j4, TILE as i64);
                b.ins().brif(c, lb, &[j4.into()], after, &[]);
                b.switch_to_block(after);
            }
        }
    }
    let next = b.ins().iadd_imm_s(i0, TILE as i64);
    b.ins().jump(head, &[next.into()]);
}

/// The host ISA (detected once per process; detection and flag parsing
/// cost about as much as compiling a small kernel).
fn host_isa() -> Result<OwnedTargetIsa, String> {
    static ISA: OnceLock<Result<OwnedTargetIsa, String>> = OnceLock::new();
    ISA.get_or_init(|| {
        let mut fb = settings::builder();
        fb.set("opt_level", "speed").map_err(|e| e.to_string())?;
        fb.set("use_colocated_libcalls", "false")
            .map_err(|e| e.to_string())?;
        fb.set("is_pic", "false").map_err(|e| e.to_string())?;
        cranelift_native::builder()?
            .finish(settings::Flags::new(fb))
            .map_err(|e| e.to_string())
    })
    .clone()
}

fn isa_and_module() -> Result<JITModule, CompileError> {
    let isa =
        host_isa().map_err(|e| CompileError::new("kernel", format!("JIT setup failed: {e}")))?;
    Ok(JITModule::new(JITBuilder::with_isa(
        isa,
        default_libcall_names(),
    )))
}

pub(crate) fn compile(
    graph: &Graph,
    kernel: &Kernel,
    inputs: &[KernelInput],
    allow_fma: bool,
    allow_tiles: bool,
) -> Result<(JITModule, KernelFn, bool), CompileError> {
    check(graph, kernel)?;
    let mut module = isa_and_module()?;
    let ptr = module.target_config().pointer_type();
    let mut ctx = module.make_context();
    let mut sig = module.make_signature();
    for t in [ptr, ptr, I64, I64] {
        sig.params.push(AbiParam::new(t));
    }
    let mut tile_sig = module.make_signature();
    for t in [ptr, ptr, I64] {
        tile_sig.params.push(AbiParam::new(t));
    }
    let tiles = if allow_tiles {
        plan_tiles(graph, kernel, inputs)
    } else {
        None
    };
    let id = module
        .declare_function("kernel", Linkage::Local, &sig)
        .map_err(|e| CompileError::new("kernel", format!("declare: {e}")))?;
    ctx.func.signature = sig;
    ctx.func.name = UserFuncName::user(0, id.as_u32());
    let mut fctx = FunctionBuilderContext::new();
    let fma = allow_fma && host_has_fma();
    {
        let mut b = FunctionBuilder::new(&mut ctx.func, &mut fctx);
        let entry = b.create_block();
        let vhead = b.create_block();
        let vbody = b.create_block();
        let shead = b.create_block();
        let sbody = b.create_block();
        let exit = b.create_block();
        for blk in [vhead, vbody, shead, sbody] {
            b.append_block_param(blk, I64);
        }
        b.append_block_params_for_function_params(entry);
        b.switch_to_block(entry);
        let p = b.block_params(entry).to_vec();
        let (ins_arr, outs_arr, start, end) = (p[0], p[1], p[2], p[3]);
        let in_ptrs: Vec<CV> = (0..inputs.len())
            .map(|j| b.ins().load(ptr, flags(), ins_arr, (j * 8) as i32))
            .collect();
        let out_ptrs: Vec<CV> = (0..kernel.outputs.len())
            .map(|j| b.ins().load(ptr, flags(), outs_arr, (j * 8) as i32))
            .collect();
        if let Some(plan) = &tiles {
            let thead = b.create_block();
            b.append_block_param(thead, I64);
            b.ins().jump(thead, &[start.into()]);
            let tile_sig = b.import_signature(tile_sig);
            emit_tiles(
                &mut b,
                plan,
                graph,
                kernel,
                inputs,
                &in_ptrs,
                &out_ptrs,
                (thead, end, vhead),
                tile_sig,
                ptr,
                fma,
            );
        } else {
            b.ins().jump(vhead, &[start.into()]);
        }

        let loop_head = |b: &mut FunctionBuilder, head: Block, body: Block, next: Block, w: i64| {
            b.switch_to_block(head);
            let i = b.block_params(head)[0];
            let iw = b.ins().iadd_imm_s(i, w);
            let c = b.ins().icmp(
                cranelift_codegen::ir::condcodes::IntCC::UnsignedLessThanOrEqual,
                iw,
                end,
            );
            b.ins().brif(c, body, &[i.into()], next, &[i.into()]);
        };
        loop_head(&mut b, vhead, vbody, shead, 4);
        b.switch_to_block(vbody);
        let i = b.block_params(vbody)[0];
        {
            let mut em = Em {
                b: &mut b,
                vec: true,
                fma,
            };
            body(&mut em, graph, kernel, inputs, &in_ptrs, &out_ptrs, i);
        }
        let i4 = b.ins().iadd_imm_s(i, 4);
        b.ins().jump(vhead, &[i4.into()]);

        // Scalar tail: the exit block takes no params, so branch through
        // a check on i < end.
        b.switch_to_block(shead);
        let i = b.block_params(shead)[0];
        let c = b.ins().icmp(
            cranelift_codegen::ir::condcodes::IntCC::UnsignedLessThan,
            i,
            end,
        );
        b.ins().brif(c, sbody, &[i.into()], exit, &[]);
        b.switch_to_block(sbody);
        let i = b.block_params(sbody)[0];
        {
            let mut em = Em {
                b: &mut b,
                vec: false,
                fma,
            };
            body(&mut em, graph, kernel, inputs, &in_ptrs, &out_ptrs, i);
        }
        let i1 = b.ins().iadd_imm_s(i, 1);
        b.ins().jump(shead, &[i1.into()]);
        b.switch_to_block(exit);
        b.ins().return_(&[]);
        b.seal_all_blocks();
        b.finalize(module.target_config());
    }
    // KILN_CLIF_DISASM=1 prints the machine code of every kernel (debugging).
    let disasm = std::env::var_os("KILN_CLIF_DISASM").is_some();
    ctx.set_disasm(disasm);
    module
        .define_function(id, &mut ctx)
        .map_err(|e| CompileError::new("kernel", format!("codegen: {e:?}")))?;
    if disasm {
        if let Some(v) = ctx.compiled_code().and_then(|c| c.vcode.as_ref()) {
            eprintln!("{v}");
        }
    }
    module.clear_context(&mut ctx);
    module
        .finalize_definitions()
        .map_err(|e| CompileError::new("kernel", format!("finalize: {e}")))?;
    let code = module.get_finalized_function(id);
    // SAFETY: the function was declared with this signature (two pointers,
    // two i64) and the default (System V / Windows x64 = "C") call conv.
    let f = unsafe { std::mem::transmute::<*const u8, KernelFn>(code) };
    Ok((module, f, tiles.is_some()))
}
