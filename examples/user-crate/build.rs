// The one line: an rpath to libtorch, and libtorch (with CUDA where the
// wheel has it) linked even though no symbol of it is used directly, so the
// binary runs without LD_LIBRARY_PATH and sees the GPU.
fn main() {
    println!("cargo:rustc-link-arg={}", std::env::var("DEP_TCH_VIS_LINK_ARG").unwrap_or_default());
}
