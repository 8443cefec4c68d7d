//! The seeded stream shared by every crate (see `dipole_lora::rng`).

pub use dipole_lora::rng::SeededRng;
