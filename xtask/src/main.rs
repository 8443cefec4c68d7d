//! `cargo xtask ...`: the command line, run from inside the repository.

fn main() -> anyhow::Result<()> {
    xtask::run_cli("cargo xtask")
}
