//! The parts of `conformance` that its two binaries share: the HTTP client vocabulary with
//! user registration (`client`) and the launcher that starts Hearth or Synapse on loopback
//! (`launcher`). The `conformance` binary adds the suite and the real-client scenarios; the
//! `hearth-bench` binary adds the load scenarios (`bench`) and the synthetic federation peer
//! they use (`peer`).

pub mod bench;
pub mod client;
pub mod launcher;
pub mod peer;
