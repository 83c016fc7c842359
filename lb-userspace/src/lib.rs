//! lb's control plane as a library: the CLI in `main.rs` is a thin shell over it, and the
//! privileged tests drive it directly.
pub mod address_rules;
pub mod api;
pub mod api_auth;
pub mod api_listen;
pub mod consul_http;
pub mod controller;
pub mod daemon;
pub mod dataplane;
pub mod dfp;
pub mod discovery;
pub mod health;
pub mod host_sockets;
pub mod l7;
pub mod model;
pub mod net;
pub mod next_hops;
pub mod owner;
pub mod privileges;
pub mod reconcile;
pub mod retry;
mod rtnl;
pub mod secret;
pub mod secret_file;
pub mod snat;
pub mod store;
pub mod supervise;
pub mod web;
