//! Export/load: round trips, and every corruption of a saved file is a
//! clear error.

use crate::common::*;
use kiln_frontend::nn::StateDict;
use kiln_frontend::{DType, Tensor};
use kiln_runtime::{from_bytes, load, TracedModule, GRAPH_KEY, VERSION_KEY};
use std::collections::HashMap;
use std::path::PathBuf;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("kiln-runtime-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn saved_mlp() -> (TracedModule, Vec<u8>) {
    let g = mlp();
    let tm = TracedModule::from_weights(g.clone(), weights_for(&g, 0)).unwrap();
    let bytes = tm.to_bytes().unwrap();
    (tm, bytes)
}

fn edit(
    bytes: &[u8],
    f: impl FnOnce(&mut HashMap<String, Tensor>, &mut HashMap<String, String>),
) -> Vec<u8> {
    let (sd, mut meta) = StateDict::from_safetensors_bytes_with_metadata(bytes).unwrap();
    let mut w: HashMap<String, Tensor> =
        sd.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
    f(&mut w, &mut meta);
    let mut sd = StateDict::new();
    let mut keys: Vec<_> = w.keys().cloned().collect();
    keys.sort();
    for k in keys {
        sd.insert(k.clone(), w[&k].clone());
    }
    sd.to_safetensors_bytes(Some(meta)).unwrap()
}

fn edit_graph(bytes: &[u8], f: impl FnOnce(&mut serde_json::Value)) -> Vec<u8> {
    edit(bytes, |_, meta| {
        let mut v: serde_json::Value = serde_json::from_str(&meta[GRAPH_KEY]).unwrap();
        f(&mut v);
        meta.insert(GRAPH_KEY.into(), v.to_string());
    })
}

fn err(bytes: &[u8]) -> String {
    from_bytes(bytes).unwrap_err().to_string()
}

#[test]
fn round_trip_through_a_file() {
    for (name, g) in [
        ("mlp", mlp()),
        ("cnn_eval", cnn(false)),
        ("block", block()),
        ("misc", misc()),
    ] {
        let tm = TracedModule::from_weights(g.clone(), weights_for(&g, 1)).unwrap();
        let path = tmp(&format!("{name}.kiln"));
        tm.save(&path).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.listing(), tm.listing(), "{name}");
        assert!(back.module().is_none());
        let xs = inputs_for(&g, 2);
        let a = tm.forward(&xs).unwrap();
        let b = back.forward(&xs).unwrap();
        for (k, (p, q)) in a.iter().zip(&b).enumerate() {
            assert_same(p, q, &format!("{name} output {k}"));
        }
    }
}

#[test]
fn a_loaded_training_graph_updates_its_own_weights() {
    let g = cnn(true);
    let w = weights_for(&g, 2);
    let tm = TracedModule::from_weights(g, copy_weights(&w)).unwrap();
    let path = tmp("cnn_train.kiln");
    tm.save(&path).unwrap();
    let back = load(&path).unwrap();
    let x = rand_t(&[2, 3, 8, 8], 4);
    let eager_w = copy_weights(&w);
    let e = cnn_eager(&x, &eager_w, true);
    assert_same(&back.call(&x).unwrap(), &e, "y");
    for b in [
        "bn.running_mean",
        "bn.running_var",
        "bn.num_batches_tracked",
    ] {
        assert_same(&back.weights()[b], &eager_w[b], b);
    }
    // Saved again, the updated statistics go with it.
    let again = from_bytes(&back.to_bytes().unwrap()).unwrap();
    assert_eq!(
        again.weights()["bn.num_batches_tracked"].to_vec_f64(),
        vec![1.0]
    );
}

#[test]
fn the_file_is_safetensors_with_the_graph_in_its_metadata() {
    let (tm, bytes) = saved_mlp();
    let (sd, meta) = StateDict::from_safetensors_bytes_with_metadata(&bytes).unwrap();
    assert_eq!(meta[VERSION_KEY], "1");
    let g = kiln_ir::format::from_json(&meta[GRAPH_KEY]).unwrap();
    assert_eq!(kiln_ir::printer::listing(&g), tm.listing());
    let mut keys = sd.keys();
    keys.sort();
    assert_eq!(
        keys,
        vec!["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]
    );
}

#[test]
fn unknown_or_missing_format_version() {
    let (_, bytes) = saved_mlp();
    let e = err(&edit(&bytes, |_, m| {
        m.insert(VERSION_KEY.into(), "99".into());
    }));
    assert_eq!(
        e,
        "<bytes>: unsupported kiln file format version \"99\" (this build reads version 1)"
    );
    let e = err(&edit(&bytes, |_, m| {
        m.remove(VERSION_KEY);
    }));
    assert_eq!(
        e,
        "<bytes>: not a kiln graph file: the safetensors metadata has no `kiln.format_version`"
    );
    let e = err(&edit(&bytes, |_, m| {
        m.remove(GRAPH_KEY);
    }));
    assert_eq!(
        e,
        "<bytes>: not a kiln graph file: the safetensors metadata has no `kiln.graph`"
    );
    // The graph JSON's own version is checked too.
    let e = err(&edit_graph(&bytes, |v| v["format_version"] = 2.into()));
    assert_eq!(
        e,
        "<bytes>: invalid graph: unsupported graph format version 2 (this build reads version 1)"
    );
}

#[test]
fn missing_unexpected_and_mismatched_weights() {
    let (_, bytes) = saved_mlp();
    let e = err(&edit(&bytes, |w, _| {
        w.remove("fc2.weight");
    }));
    assert_eq!(
        e,
        "<bytes>: missing weight: the graph's parameter `fc2.weight` (f32[5,30]) is not in the file"
    );
    let e = err(&edit(&bytes, |w, _| {
        w.insert("fc2.weight".into(), Tensor::zeros(&[5, 31], DType::F32));
    }));
    assert_eq!(
        e,
        "<bytes>: weight `fc2.weight` is f32[5,31] in the file, the graph's parameter is f32[5,30]"
    );
    let e = err(&edit(&bytes, |w, _| {
        w.insert("fc1.bias".into(), Tensor::zeros(&[30], DType::F64));
    }));
    assert_eq!(
        e,
        "<bytes>: weight `fc1.bias` is f64[30] in the file, the graph's parameter is f32[30]"
    );
    let e = err(&edit(&bytes, |w, _| {
        w.insert("stray".into(), Tensor::zeros(&[1], DType::F32));
    }));
    assert_eq!(
        e,
        "<bytes>: the file holds tensors the graph does not use: [\"stray\"]"
    );
}

#[test]
fn cyclic_and_ill_typed_graphs() {
    let (_, bytes) = saved_mlp();
    // Positions of nodes in the file (topological order).
    let (_, meta) = StateDict::from_safetensors_bytes_with_metadata(&bytes).unwrap();
    let v: serde_json::Value = serde_json::from_str(&meta[GRAPH_KEY]).unwrap();
    let find = |name: &str| {
        v["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .position(|n| n["op"].to_string().contains(name))
            .unwrap()
    };
    let (permute, relu) = (find("Permute"), find("Relu"));
    let e = err(&edit_graph(&bytes, |v| {
        v["nodes"][permute]["operands"] = serde_json::json!([[relu, 0]]);
    }));
    assert!(
        e.starts_with("<bytes>: invalid graph: graph verification failed: the graph has a cycle"),
        "{e}"
    );
    let e = err(&edit_graph(&bytes, |v| {
        v["nodes"][relu]["outputs"][0]["shape"] = serde_json::json!([8, 31]);
    }));
    assert!(
        e.starts_with("<bytes>: invalid graph: graph verification failed: node %")
            && e.contains("(relu) is ill-typed: it records output types [f32[8,31]] but its operands give [f32[8,30]]"),
        "{e}"
    );
    let e = err(&edit_graph(&bytes, |v| {
        v["nodes"][relu]["op"] = serde_json::json!({"Frobnicate": null});
    }));
    assert!(
        e.starts_with("<bytes>: invalid graph: graph file:") && e.contains("Frobnicate"),
        "{e}"
    );
}

#[test]
fn truncated_and_corrupt_files() {
    let (_, bytes) = saved_mlp();
    for cut in [bytes.len() - 1, bytes.len() / 2, 20, 7, 0] {
        let e = err(&bytes[..cut]);
        assert!(
            e.starts_with("<bytes>: not a valid safetensors file"),
            "cut at {cut}: {e}"
        );
    }
    // A header length pointing past the end of the file.
    let mut b = bytes.clone();
    b[0..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    assert!(err(&b).starts_with("<bytes>: not a valid safetensors file"));
    // A flipped byte inside the JSON header.
    let mut b = bytes.clone();
    b[9] = b'#';
    assert!(err(&b).starts_with("<bytes>: not a valid safetensors file"));
    // Through the file system, errors name the path.
    let path = tmp("truncated.kiln");
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("{}: not a valid safetensors file", path.display())),
        "{e}"
    );
    let e = load(tmp("does-not-exist.kiln")).unwrap_err().to_string();
    assert!(e.contains("does-not-exist.kiln: cannot read:"), "{e}");
}
