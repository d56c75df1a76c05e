pub mod completions;
pub mod dev;
pub mod jobs;
pub mod nodes;
