//! twinblock: the node. Config, exports, volumes, admin API.
