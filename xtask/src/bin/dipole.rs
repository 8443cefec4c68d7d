//! `dipole ...`: the command line, installed (`cargo install --path xtask --bin dipole`).

fn main() -> anyhow::Result<()> {
    xtask::run_cli("dipole")
}
