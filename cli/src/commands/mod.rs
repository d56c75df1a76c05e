pub mod completions;
pub mod dev;
pub mod jobs;
pub mod nodes;
pub mod telemetry;
pub mod tokens;
pub mod top;
pub mod usage;
