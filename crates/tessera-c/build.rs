//! Writes `include/tessera.h` from this crate's `extern "C"` items with cbindgen, only when
//! its content changes (the header is committed, so a C user needs no Rust tool to read it).

fn main() {
    let crate_dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets it");
    println!("cargo:rerun-if-changed=src/lib.rs");
    println!("cargo:rerun-if-changed=cbindgen.toml");
    let config =
        cbindgen::Config::from_file(format!("{crate_dir}/cbindgen.toml")).expect("cbindgen.toml");
    let bindings = match cbindgen::Builder::new()
        .with_crate(&crate_dir)
        .with_config(config)
        .generate()
    {
        Ok(bindings) => bindings,
        Err(error) => panic!("cannot generate include/tessera.h: {error}"),
    };
    let mut text = Vec::new();
    bindings.write(&mut text);
    let header = std::path::Path::new(&crate_dir).join("../../include/tessera.h");
    if std::fs::read(&header).ok().as_deref() != Some(text.as_slice()) {
        std::fs::write(&header, text).expect("write include/tessera.h");
    }
}
