//! Embeds the eBPF object built by `cargo xtask build-ebpf`, or fails with one line that
//! says so.
use std::path::PathBuf;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("..");
    let object = root.join("lb-ebpf/target/bpfel-unknown-none/release/lb-ebpf");
    println!("cargo:rerun-if-changed={}", object.display());
    if object.is_file() {
        println!(
            "cargo:rustc-env=LB_EBPF_OBJECT={}",
            object.canonicalize().unwrap().display()
        );
    } else {
        println!(
            "cargo::error=the eBPF object lb-ebpf/target/bpfel-unknown-none/release/lb-ebpf is missing: run `cargo xtask build-ebpf` first"
        );
    }
}
