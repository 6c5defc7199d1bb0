//! The elementwise and reduction op vocabulary shared by eager kernels
//! (kiln-cpu), the graph IR and every backend, so that an op means the same
//! thing everywhere. Structural ops (matmul, conv, views...) join the graph op
//! set with the tracing issue.

/// One-input elementwise ops. Parameters are f64 like PyTorch's Python scalars.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum UnaryOp {
    Neg,
    Abs,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Sin,
    Cos,
    Tanh,
    Sigmoid,
    Relu,
    /// max(x, 0) + slope * min(x, 0)
    LeakyRelu(f64),
    /// x * Phi(x) with the exact normal CDF (`gelu(approximate='none')`)
    GeluErf,
    /// `gelu(approximate='tanh')`
    GeluTanh,
    Erf,
    /// clamp(x, min, max); either bound may be absent
    Clamp(Option<f64>, Option<f64>),
    /// x ** p
    PowScalar(f64),
    /// s ** x
    RPowScalar(f64),
    AddScalar(f64),
    MulScalar(f64),
    /// s - x
    RSubScalar(f64),
    /// s / x
    RDivScalar(f64),
    Square,
    Reciprocal,
    Sign,
    /// 1 where x > 0 else 0 (relu's derivative mask, as the input dtype)
    Step,
}

impl UnaryOp {
    /// Lower-case aten-like name, used in error messages and IR printing.
    pub fn name(&self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Abs => "abs",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Rsqrt => "rsqrt",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Relu => "relu",
            UnaryOp::LeakyRelu(_) => "leaky_relu",
            UnaryOp::GeluErf => "gelu",
            UnaryOp::GeluTanh => "gelu_tanh",
            UnaryOp::Erf => "erf",
            UnaryOp::Clamp(..) => "clamp",
            UnaryOp::PowScalar(_) => "pow",
            UnaryOp::RPowScalar(_) => "rpow",
            UnaryOp::AddScalar(_) => "add",
            UnaryOp::MulScalar(_) => "mul",
            UnaryOp::RSubScalar(_) => "rsub",
            UnaryOp::RDivScalar(_) => "rdiv",
            UnaryOp::Square => "square",
            UnaryOp::Reciprocal => "reciprocal",
            UnaryOp::Sign => "sign",
            UnaryOp::Step => "step",
        }
    }
}

/// Two-input elementwise ops (with broadcasting).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Maximum,
    Minimum,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl BinaryOp {
    pub fn name(&self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Pow => "pow",
            BinaryOp::Maximum => "maximum",
            BinaryOp::Minimum => "minimum",
            BinaryOp::Eq => "eq",
            BinaryOp::Ne => "ne",
            BinaryOp::Lt => "lt",
            BinaryOp::Le => "le",
            BinaryOp::Gt => "gt",
            BinaryOp::Ge => "ge",
        }
    }

    /// Comparisons produce bool tensors.
    pub fn is_comparison(&self) -> bool {
        matches!(
            self,
            BinaryOp::Eq | BinaryOp::Ne | BinaryOp::Lt | BinaryOp::Le | BinaryOp::Gt | BinaryOp::Ge
        )
    }
}

/// Reductions over a set of dimensions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
}

impl ReduceOp {
    pub fn name(&self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Mean => "mean",
            ReduceOp::Max => "max",
            ReduceOp::Min => "min",
            ReduceOp::Prod => "prod",
        }
    }
}
