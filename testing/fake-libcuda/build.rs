//! Gives the shared object the soname of the real driver, so that loading it as
//! `libcuda.so.1` through a symlink behaves like the real library.

fn main() {
    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcuda.so.1");
}
