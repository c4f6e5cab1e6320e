//! The parts of `conformance` that its two binaries share: the HTTP client vocabulary with
//! user registration (`client`) and the launcher that starts Hearth or Synapse on loopback
//! (`launcher`). The `conformance` binary adds the suite and the real-client scenarios; the
//! `hearth-bench` binary adds the load scenarios (`bench`).

pub mod bench;
pub mod client;
pub mod launcher;
