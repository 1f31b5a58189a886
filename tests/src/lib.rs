//! Test support for Aegis's root-only integration tests and the demo.
//!
//! [`world`] builds a disposable "small world" of network namespaces (a node running the agent,
//! an "internet" with DNS and HTTP servers, and pods running workloads) and tears it down in
//! `Drop`; [`kube`] runs a Kubernetes API emulator in a world for the pod identity tests.
//! Everything here needs root, real cgroups and network namespaces; nothing is skipped
//! silently when a prerequisite is missing.

pub mod kube;
pub mod openmetrics;
pub mod report;
pub mod world;
