//! Generated protobuf types and gRPC stubs for the node agent's API (`kybernate.agent.v1`).
//!
//! The shim, `kybernatectl` and the agent all speak this API over the agent's Unix socket.

#![allow(missing_docs, clippy::all, missing_debug_implementations)]

/// Version 1 of the agent API.
pub mod agent {
    pub mod v1 {
        tonic::include_proto!("kybernate.agent.v1");
    }
}
