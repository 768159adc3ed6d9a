//! The `llmos` binary (placeholder until the demo lands).
fn main() {}
