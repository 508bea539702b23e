//! twinblock: the node. Config, volumes, the admin API, and the daemon's assembly of them.

pub mod admin;
pub mod arrays;
pub mod cache;
pub mod candidates;
pub mod config;
pub mod create;
pub mod device;
pub mod disk_check;
pub mod ha;
pub mod history;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod nvram_loss;
pub mod pair;
pub mod sd_notify;
pub mod signals;
pub mod site;
