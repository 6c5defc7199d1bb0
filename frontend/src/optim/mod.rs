//! Optimizers (SGD, Adam, AdamW) over `Module::parameters()`.
