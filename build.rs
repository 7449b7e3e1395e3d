//! Build script: compiles kernels/*.cu with nvcc when it is found (being built).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
