//! lb's privileged suites, one module each, linked into one test binary: a binary per suite
//! meant one release link (thin LTO) per suite, 17 minutes of `cargo xtask test`'s build
//! on 2 cores, against 4 for this one.
//! `cargo xtask test` still runs each suite in a process of its own (its tests by exact
//! name), one test at a time.
mod direct_packets;
mod e2e_acme;
mod e2e_address_rules;
mod e2e_api;
mod e2e_api_security;
mod e2e_churn;
mod e2e_dfp;
mod e2e_direct;
mod e2e_discovery;
mod e2e_flood;
mod e2e_forwarding;
mod e2e_grpc;
mod e2e_health;
mod e2e_https;
mod e2e_l7;
mod e2e_l7_failures;
mod e2e_l7_slow_clients;
mod e2e_privileges;
mod e2e_restart;
mod e2e_store;
mod fuzz;
mod packets;
mod port_economy;
mod scale;
mod store_contract;
mod store_faults;
mod store_fuzz;
mod store_tls;
