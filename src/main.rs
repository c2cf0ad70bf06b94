//! The `ckptstore` command.
fn main() {}
