//! `bench`: builds the lab and runs the project's measurements.
fn main() -> anyhow::Result<()> {
    bench::lab::install_signal_teardown()?;
    Ok(())
}
