//! Link libtorch so that binaries and test executables run without
//! `LD_LIBRARY_PATH` and see CUDA when a GPU is present.
//!
//! * `DEP_TCH_LIBTORCH_LIB` is exported by `torch-sys` (a direct dependency,
//!   `links = "tch"`); it is the directory holding `libtorch*.so`, which we
//!   add as an rpath.
//! * `--no-as-needed -ltorch` keeps `libtorch.so` (which pulls in
//!   `libtorch_cuda.so` where it exists) in the executable's `NEEDED` list even
//!   though no symbol of it is referenced directly; without it the CUDA backend
//!   is never loaded and `tch::Cuda::is_available()` is silently false.
//! * The same link arguments reach only this package's own targets, so they
//!   are passed on to crates that depend on tch-vis (`links = "tch-vis"`)
//!   as `DEP_TCH_VIS_LINK_ARG`: one line of their `build.rs` applies them
//!   (see `examples/user-crate`).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        if let Some(lib) = std::env::var_os("DEP_TCH_LIBTORCH_LIB") {
            let dir = std::path::PathBuf::from(&lib);
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch");
            // The CUDA libraries of the PyPI wheel live in sibling packages
            // (nvidia/*/lib); libtorch_cuda.so finds them through its own
            // $ORIGIN-relative rpath, so nothing more is needed here.
            let cuda = dir.join("libtorch_cuda.so").exists();
            if cuda {
                println!("cargo:rustc-link-arg=-ltorch_cuda");
            }
            println!(
                "cargo:link_arg=-Wl,-rpath,{},--no-as-needed,-ltorch{}",
                dir.display(),
                if cuda { ",-ltorch_cuda" } else { "" }
            );
        } else {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
            println!("cargo:rustc-link-arg=-ltorch");
        }
    }
}
