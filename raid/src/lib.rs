//! twinblock-raid: RAID arrays over shared disk images. Knows nothing of NBD or HA.

pub mod io;
