//! Embeds the eBPF objects built by `cargo xtask build-ebpf` (the balancer's and the
//! backends' decapsulation program), or fails with one line that says so.
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    for (var, name) in [
        ("LB_EBPF_OBJECT", "lb-ebpf"),
        ("LB_DECAP_OBJECT", "lb-decap"),
    ] {
        let object = root
            .join("lb-ebpf/target/bpfel-unknown-none/release")
            .join(name);
        println!("cargo:rerun-if-changed={}", object.display());
        if object.is_file() {
            println!(
                "cargo:rustc-env={var}={}",
                object.canonicalize().unwrap().display()
            );
        } else {
            println!(
                "cargo::error=the eBPF object lb-ebpf/target/bpfel-unknown-none/release/{name} is missing: run `cargo xtask build-ebpf` first"
            );
        }
    }
}
