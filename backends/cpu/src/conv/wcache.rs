//! Prepared (packed or transformed) conv weights of recent calls, shared
//! by the direct and Winograd kernels. The key is the weights' bits, not
//! their address: a call with equal weights (the next forward of a model,
//! eager or compiled) skips the preparation, and an optimizer step or
//! `load_state_dict` changes the bits and misses, so a stale entry can
//! never be used. Comparing is a memcmp, several times cheaper than the
//! strided packing or the Winograd transform (64x128x3x3 weights: about a
//! fifth of the transform; complex_net's 16->32 packing was 10% of its
//! forward at batch 8).

use std::sync::{Arc, Mutex};

/// What the entry holds (entries of different kinds never match).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Kind {
    /// `direct::pack_weights`.
    Direct,
    /// `winograd::transform_weights`.
    Winograd,
}

struct Entry {
    kind: Kind,
    cout: usize,
    bits: Vec<u32>,
    prepared: Arc<Vec<f32>>,
}

/// Entries kept, and the most weight elements kept over all entries.
const ENTRIES: usize = 32;
const ELEMS: usize = 1 << 24;

static CACHE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());

/// The prepared form of `w` (`cout` output channels) for `kind`: from the
/// cache, or made by `prepare` (and cached, the least recently used
/// entries making room).
pub(super) fn get(
    kind: Kind,
    w: &[f32],
    cout: usize,
    prepare: impl FnOnce(&mut Vec<f32>),
) -> Arc<Vec<f32>> {
    // SAFETY: f32 and u32 have the same size and alignment; every bit
    // pattern is a valid u32.
    let wbits = unsafe { std::slice::from_raw_parts(w.as_ptr().cast::<u32>(), w.len()) };
    let mut c = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = c
        .iter()
        .position(|e| e.kind == kind && e.cout == cout && e.bits[..] == wbits[..])
    {
        let e = c.remove(i);
        let out = e.prepared.clone();
        c.insert(0, e);
        return out;
    }
    let mut total: usize = c.iter().map(|e| e.bits.len()).sum();
    let mut spare = None;
    while !c.is_empty() && (c.len() >= ENTRIES || total + w.len() > ELEMS) {
        let e = c.pop().expect("not empty");
        total -= e.bits.len();
        // Reuse the buffers of an evicted entry nobody holds any more.
        if let Ok(v) = Arc::try_unwrap(e.prepared) {
            spare = Some((e.bits, v));
        }
    }
    drop(c);
    let (mut bits, mut prepared) = spare.unwrap_or_default();
    prepare(&mut prepared);
    let prepared = Arc::new(prepared);
    if w.len() <= ELEMS {
        bits.clear();
        bits.extend_from_slice(wbits);
        let mut c = CACHE.lock().unwrap_or_else(|p| p.into_inner());
        c.insert(
            0,
            Entry {
                kind,
                cout,
                bits,
                prepared: prepared.clone(),
            },
        );
    }
    prepared
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Equal bits hit, changed bits (even one) miss, kinds never mix.
    #[test]
    fn entries_match_by_bits_and_kind() {
        let mut w: Vec<f32> = (0..50).map(|i| i as f32 * 0.37 - 3.0).collect();
        let calls = std::cell::Cell::new(0);
        let prep = |w: &[f32], out: &mut Vec<f32>| {
            calls.set(calls.get() + 1);
            out.clear();
            out.extend(w.iter().map(|v| v * 2.0));
        };
        let a = get(Kind::Direct, &w, 5, |o| prep(&w, o));
        let b = get(Kind::Direct, &w.clone(), 5, |o| prep(&w, o));
        assert_eq!(calls.get(), 1);
        assert_eq!(a, b);
        let _ = get(Kind::Winograd, &w, 5, |o| prep(&w, o));
        assert_eq!(calls.get(), 2);
        w[49] = f32::from_bits(w[49].to_bits() ^ 1);
        let c = get(Kind::Direct, &w, 5, |o| prep(&w, o));
        assert_eq!(calls.get(), 3);
        assert_eq!(c[49], w[49] * 2.0);
    }
}
