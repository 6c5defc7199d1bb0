//! `kiln::set_num_threads`: the calling thread joins rayon's global pool
//! (its own test binary: the global pool can be built once per process).

#[test]
fn set_num_threads_builds_the_pool_once_with_the_caller_in_it() {
    let e = kiln::set_num_threads(0).unwrap_err().to_string();
    assert!(
        e.contains("set_num_threads") && e.contains("at least 1"),
        "{e}"
    );
    kiln::set_num_threads(2).unwrap();
    assert_eq!(rayon::current_num_threads(), 2);
    // The caller is worker 0 of the pool.
    assert_eq!(rayon::current_thread_index(), Some(0));
    let e = kiln::set_num_threads(2).unwrap_err().to_string();
    assert!(e.contains("2 threads"), "{e}");
    // Parallel kernels still give the right answer from the caller.
    let x =
        kiln::Tensor::from_vec((0..100_000).map(|i| (i % 7) as f32).collect(), &[100_000]).unwrap();
    let s = x.sum().unwrap().item().unwrap();
    assert_eq!(s, (0..100_000u64).map(|i| i % 7).sum::<u64>() as f64);
}
