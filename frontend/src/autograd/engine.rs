//! The backward engine. From the root gradients it walks the graph of
//! `Node`s, counts dependencies, and runs each node once all gradients for
//! its outputs have arrived, choosing among ready nodes the most recently
//! created first (PyTorch's order, which the hook tests rely on). Tensor
//! hooks run before a node consumes its gradients; `retain_grad` outputs and
//! `autograd::grad` captures read the gradient after the hooks.

use super::{edge_of, set_grad_enabled, Node, NodeKind};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::Arc;

type Key = *const Node;

fn key(n: &Arc<Node>) -> Key {
    Arc::as_ptr(n)
}

struct Ready {
    seq: u64,
    node: Arc<Node>,
}

impl PartialEq for Ready {
    fn eq(&self, o: &Self) -> bool {
        self.seq == o.seq && key(&self.node) == key(&o.node)
    }
}
impl Eq for Ready {}
impl PartialOrd for Ready {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Ready {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.seq
            .cmp(&o.seq)
            .then_with(|| key(&self.node).cmp(&key(&o.node)))
    }
}

const FREED: &str = "Trying to backward through the graph a second time (or directly access saved tensors after they have already been freed). Saved intermediate values of the graph are freed when you call .backward() or autograd.grad(). Specify retain_graph=True if you need to backward through the graph a second time or if you need to access saved tensors after calling backward.";

/// Restores grad mode on drop.
struct GradMode(bool);
impl Drop for GradMode {
    fn drop(&mut self) {
        set_grad_enabled(self.0);
    }
}

fn accumulate(slot: &mut Option<Tensor>, g: Tensor) -> Result<()> {
    *slot = Some(match slot.take() {
        None => g,
        Some(prev) => prev.add(&g)?,
    });
    Ok(())
}

thread_local! {
    /// The `retain_graph` of the backward running on this thread.
    static RETAIN_GRAPH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Restores the enclosing backward's `retain_graph` when dropped.
struct RetainScope(bool);

impl Drop for RetainScope {
    fn drop(&mut self) {
        RETAIN_GRAPH.with(|r| r.set(self.0));
    }
}

/// Whether the backward now running on this thread keeps the graph
/// (`retain_graph=True`): a function's backward may then run again, so it
/// must not consume what it saved. False outside a backward.
pub fn retains_graph() -> bool {
    RETAIN_GRAPH.with(|r| r.get())
}

/// Runs backward from `roots` seeded with `grads`. With `capture`, returns
/// the gradients reaching those tensors and accumulates into no `.grad`
/// (that is `autograd::grad`); otherwise accumulates into leaves and
/// returns an empty Vec.
pub(crate) fn run_backward(
    roots: &[Tensor],
    grads: &[Tensor],
    retain_graph: bool,
    create_graph: bool,
    capture: Option<&[Tensor]>,
) -> Result<Vec<Option<Tensor>>> {
    if create_graph {
        // Backward closures save detached tensors, so a graph of the
        // gradient would miss the dependence through saved values and give
        // silently wrong higher-order derivatives. Refuse instead.
        return Err(Error::Autograd(
            "create_graph=True (higher-order gradients) is not supported yet: saved tensors are detached, so the graph of the gradient would be incomplete".into(),
        ));
    }
    let _mode = GradMode(set_grad_enabled(create_graph));
    let _retain = RetainScope(RETAIN_GRAPH.with(|r| r.replace(retain_graph)));

    // Root edges and their seed gradients.
    let mut buffers: HashMap<Key, Vec<Option<Tensor>>> = HashMap::new();
    let mut nodes: HashMap<Key, Arc<Node>> = HashMap::new();
    let mut root_nodes = Vec::new();
    for (i, (r, g)) in roots.iter().zip(grads).enumerate() {
        if r.shape() != g.shape() {
            return Err(Error::Autograd(format!(
                "Mismatch in shape: grad_output[{i}] has a shape of {:?} and output[{i}] has a shape of {:?}",
                g.shape(),
                r.shape()
            )));
        }
        let edge = edge_of(r).ok_or_else(|| {
            Error::Autograd(format!(
                "element {i} of tensors does not require grad and does not have a grad_fn"
            ))
        })?;
        let k = key(&edge.node);
        let buf = buffers
            .entry(k)
            .or_insert_with(|| vec![None; edge.node.num_outputs]);
        accumulate(&mut buf[edge.input_nr], g.detach())?;
        nodes.insert(k, edge.node.clone());
        root_nodes.push(edge.node);
    }

    // Capture targets: (node, output_nr) per requested input.
    let mut targets: Vec<(Key, usize)> = Vec::new();
    let mut keep_alive = Vec::new();
    if let Some(inputs) = capture {
        for (i, t) in inputs.iter().enumerate() {
            let e = edge_of(t).ok_or_else(|| {
                Error::Autograd(format!(
                    "One of the differentiated Tensors (input {i}) does not require grad"
                ))
            })?;
            targets.push((key(&e.node), e.input_nr));
            keep_alive.push(e.node);
        }
    }

    // Discover the graph and a topological order (parents before children).
    let mut deps: HashMap<Key, usize> = HashMap::new();
    let mut stack: Vec<Arc<Node>> = root_nodes.clone();
    let mut seen: HashSet<Key> = root_nodes.iter().map(key).collect();
    while let Some(n) = stack.pop() {
        for e in n.next.iter().flatten() {
            let k = key(&e.node);
            *deps.entry(k).or_insert(0) += 1;
            if seen.insert(k) {
                nodes.insert(k, e.node.clone());
                stack.push(e.node.clone());
            }
        }
    }
    let mut order = Vec::with_capacity(nodes.len());
    {
        let mut d = deps.clone();
        let mut queue: Vec<Key> = nodes
            .keys()
            .copied()
            .filter(|k| d.get(k).copied().unwrap_or(0) == 0)
            .collect();
        while let Some(k) = queue.pop() {
            order.push(k);
            for e in nodes[&k].next.iter().flatten() {
                let c = d.get_mut(&key(&e.node)).unwrap();
                *c -= 1;
                if *c == 0 {
                    queue.push(key(&e.node));
                }
            }
        }
    }

    // In capture mode only nodes that lead to a target run.
    let needed: Option<HashSet<Key>> = capture.map(|_| {
        let mut needed = HashSet::new();
        for &k in order.iter().rev() {
            let n = &nodes[&k];
            if targets.iter().any(|(t, _)| *t == k)
                || n.next
                    .iter()
                    .flatten()
                    .any(|e| needed.contains(&key(&e.node)))
            {
                needed.insert(k);
            }
        }
        needed
    });
    let is_needed = |k: Key| needed.as_ref().is_none_or(|s| s.contains(&k));
    if needed.is_some() {
        // Recount dependencies over needed parents only.
        deps.clear();
        for &k in &order {
            if is_needed(k) {
                for e in nodes[&k].next.iter().flatten() {
                    *deps.entry(key(&e.node)).or_insert(0) += 1;
                }
            }
        }
    }

    let mut results: Vec<Option<Tensor>> = vec![None; targets.len()];
    let mut heap = BinaryHeap::new();
    let mut queued: HashSet<Key> = HashSet::new();
    for n in &root_nodes {
        let k = key(n);
        if deps.get(&k).copied().unwrap_or(0) == 0 && is_needed(k) && queued.insert(k) {
            heap.push(Ready {
                seq: n.seq,
                node: n.clone(),
            });
        }
    }

    while let Some(Ready { node, .. }) = heap.pop() {
        let k = key(&node);
        let mut grads = buffers
            .remove(&k)
            .unwrap_or_else(|| vec![None; node.num_outputs]);

        // Tensor hooks: a non-leaf's live on its grad_fn, a leaf's on itself.
        let hooks: Vec<_> = match &node.kind {
            NodeKind::AccumulateGrad(leaf) => leaf
                .meta
                .lock()
                .hooks
                .iter()
                .map(|(_, h)| (0usize, h.clone()))
                .collect(),
            NodeKind::Function(_) => node
                .pre_hooks
                .lock()
                .iter()
                .map(|(_, nr, h)| (*nr, h.clone()))
                .collect(),
        };
        for (nr, h) in hooks {
            if let Some(g) = &grads[nr] {
                if let Some(r) = h(g) {
                    if r.shape() != g.shape() {
                        return Err(Error::Autograd(format!(
                            "hook of {} returned a gradient of shape {:?}, expected {:?}",
                            node.name(),
                            r.shape(),
                            g.shape()
                        )));
                    }
                    grads[nr] = Some(r);
                }
            }
        }
        if capture.is_none() {
            let retained = node.retained.lock().clone();
            for (nr, weak) in retained {
                if let (Some(t), Some(g)) = (weak.upgrade(), &grads[nr]) {
                    let t = Tensor { inner: t };
                    accumulate_grad(&t, g, create_graph)?;
                }
            }
        }
        for (i, (tk, nr)) in targets.iter().enumerate() {
            if *tk == k {
                if let Some(g) = &grads[*nr] {
                    accumulate(&mut results[i], g.clone())?;
                }
            }
        }

        let outputs: Vec<Option<Tensor>> = match &node.kind {
            NodeKind::AccumulateGrad(leaf) => {
                if capture.is_none() {
                    if let Some(g) = &grads[0] {
                        accumulate_grad(
                            &Tensor {
                                inner: leaf.clone(),
                            },
                            g,
                            create_graph,
                        )?;
                    }
                }
                Vec::new()
            }
            NodeKind::Function(f) => {
                let mut guard = f.lock();
                let func = guard
                    .as_ref()
                    .ok_or_else(|| Error::Autograd(FREED.into()))?;
                let needs: Vec<bool> = node
                    .next
                    .iter()
                    .map(|e| e.as_ref().is_some_and(|e| is_needed(key(&e.node))))
                    .collect();
                let out = if grads.iter().all(|g| g.is_none()) {
                    vec![None; node.next.len()]
                } else {
                    func(&grads, &needs).map_err(|e| match e {
                        Error::Autograd(m) => Error::Autograd(m),
                        other => Error::Autograd(format!("in {}: {other}", node.name())),
                    })?
                };
                if !retain_graph {
                    *guard = None;
                }
                if out.len() != node.next.len() {
                    return Err(Error::Autograd(format!(
                        "function {} returned {} gradients, expected {}",
                        node.name(),
                        out.len(),
                        node.next.len()
                    )));
                }
                out
            }
        };

        for (e, g) in node.next.iter().zip(outputs) {
            let Some(e) = e else { continue };
            let ck = key(&e.node);
            if !is_needed(ck) {
                continue;
            }
            if let Some(g) = g {
                let buf = buffers
                    .entry(ck)
                    .or_insert_with(|| vec![None; e.node.num_outputs]);
                accumulate(&mut buf[e.input_nr], g)?;
            }
            let c = deps.get_mut(&ck).expect("dependency counted");
            *c -= 1;
            if *c == 0 && queued.insert(ck) {
                heap.push(Ready {
                    seq: e.node.seq,
                    node: e.node.clone(),
                });
            }
        }
    }
    Ok(results)
}

/// Adds `g` into `t.grad` (PyTorch's AccumulateGrad): the first gradient is
/// copied into a fresh tensor, later ones are added in place (or out of
/// place when building a graph of the gradient).
fn accumulate_grad(t: &Tensor, g: &Tensor, create_graph: bool) -> Result<()> {
    if g.shape() != t.shape() {
        return Err(Error::Autograd(format!(
            "invalid gradient for a tensor of shape {:?}: got shape {:?}",
            t.shape(),
            g.shape()
        )));
    }
    let g = if g.dtype() != t.dtype() {
        g.to_dtype(t.dtype())?
    } else {
        g.clone()
    };
    let cur = t.grad();
    let new = match cur {
        None => {
            if create_graph {
                g
            } else {
                g.detach().clone_tensor()?
            }
        }
        Some(prev) => {
            if create_graph {
                prev.add(&g)?
            } else {
                prev.add_(&g)?;
                prev
            }
        }
    };
    t.set_grad(Some(new));
    Ok(())
}

/// `torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph,
/// create_graph, allow_unused)`: the gradients of `outputs` with respect to
/// `inputs`, without touching any `.grad`. `grad_outputs` defaults to ones
/// for one-element outputs. An input the outputs do not depend on is an
/// error unless `allow_unused` (then its gradient is None).
pub fn grad(
    outputs: &[Tensor],
    inputs: &[Tensor],
    grad_outputs: Option<&[Tensor]>,
    retain_graph: bool,
    create_graph: bool,
    allow_unused: bool,
) -> Result<Vec<Option<Tensor>>> {
    let gs: Vec<Tensor> = match grad_outputs {
        Some(g) => {
            if g.len() != outputs.len() {
                return Err(Error::Autograd(format!(
                    "grad requires one grad_output per output: got {} for {} outputs",
                    g.len(),
                    outputs.len()
                )));
            }
            g.to_vec()
        }
        None => outputs
            .iter()
            .map(|o| {
                if o.numel() != 1 {
                    Err(Error::Autograd(format!(
                        "grad can be implicitly created only for scalar outputs (got shape {:?})",
                        o.shape()
                    )))
                } else {
                    o.ones_like()
                }
            })
            .collect::<Result<_>>()?,
    };
    let res = run_backward(
        outputs,
        &gs,
        retain_graph || create_graph,
        create_graph,
        Some(inputs),
    )?;
    if !allow_unused {
        if let Some(i) = res.iter().position(|r| r.is_none()) {
            return Err(Error::Autograd(format!(
                "One of the differentiated Tensors (input {i}) appears to not have been used in the graph. Set allow_unused=True if this is the desired behavior."
            )));
        }
    }
    Ok(res)
}
