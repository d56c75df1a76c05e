pub mod dev;
pub mod jobs;
pub mod nodes;
pub mod usage;
