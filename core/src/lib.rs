//! The facts agent, controller and CLI share: the GPU catalogue and
//! generation names, sizes, job and workload state predicates, the
//! injected [`Clock`], private files for secrets, and the limits on what a
//! client may send (`limits`). Plain Rust over the
//! proto's enums; no I/O framework, no async.

pub mod catalog;
pub mod clock;
pub mod container;
pub mod layered;
pub mod leader;
pub mod limits;
pub mod private_file;
pub mod states;
pub mod units;

pub use catalog::{
    CatalogError, ModelSpec, all_generations, generation_name, generation_names, parse_generation,
};
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use private_file::write_private_file;
pub use states::{is_terminal_job, is_terminal_workload};
pub use units::parse_size;
