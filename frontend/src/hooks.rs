//! `RemovableHandle`: what every hook registration returns (tensor hooks,
//! module hooks). `remove()` unregisters the hook; dropping the handle
//! leaves the hook in place, as in PyTorch.

use std::fmt;

pub struct RemovableHandle {
    id: u64,
    remover: Option<Box<dyn FnOnce(u64) + Send + Sync>>,
}

impl RemovableHandle {
    pub(crate) fn new(id: u64, remover: impl FnOnce(u64) + Send + Sync + 'static) -> Self {
        RemovableHandle {
            id,
            remover: Some(Box::new(remover)),
        }
    }

    /// The registration's id (unique across the process).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Unregisters the hook. Calling it again does nothing.
    pub fn remove(&mut self) {
        if let Some(r) = self.remover.take() {
            r(self.id);
        }
    }
}

impl fmt::Debug for RemovableHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RemovableHandle(id={})", self.id)
    }
}

/// A fresh id for a hook registration.
pub(crate) fn next_hook_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
